"""Replay of pre-training text during SFT (rehearsal, as in InstructGPT's PPO-ptx): the objective becomes

    L(θ) = (1 − α) · L_task(B) + α · L_lm(R)

where L_task is the SFT token-mean loss of the task batch B, L_lm the token-mean next-token loss of R, a batch of
``windows`` pre-training windows of ``max_length`` tokens, and α = ``weight``. Both parts are chunks whose token-sum
losses carry their own normalizer (N_B / (1 − α), N_R / α), so the chunks still sum to L and the probes measure the
Hessian of exactly this objective. α = 0 is plain SFT.

Why: forgetting. The embedded model is small and its prose thin, so SFT on arithmetic alone raises its held-out
perplexity ≈ 4× at the learning rate that teaches the task; replaying the pre-training mix anchors the
language-model head. The replay text is the pre-training *train* split, never the retention split that measures
forgetting.

Data order: the pool is the first ``pool`` windows of the texts concatenated (EOS-separated) and cut into
``max_length``-token windows; steps walk per-epoch permutations of the pool exactly like the SFT stream (one integer
cursor of windows consumed), so replay resumes bitwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from agents.sft import Chunk, stream_indices


@dataclass(frozen=True)
class ReplayConfig:
    """Pre-training text mixed into SFT batches (see agents/replay.py)."""

    weight: float = 0.0
    """α: the replay loss's share of the objective, (1 − α) L_task + α L_lm (0 = plain SFT)."""
    windows: int = 4
    """Pre-training windows (of train.max_length tokens) per optimizer step. 4 x 128 tokens beside SFT's 64
    examples: 0.94 held-out at retention x1.05 for about the step time of plain SFT; 8 gave 0.96 at x1.00 for
    ~20 % more time per step (embedded model, ArithRLVR-v0, the SFT default)."""
    pool: int = 4096
    """Windows in the replay pool, cut from the start of the pre-training train split."""
    source: str = "auto"
    """auto (the embedded model's pre-training train split when the policy descends from it), or a JSON file of a
    list of texts, or a plain-text file (one document per blank-line-separated block)."""


def config_errors(cfg: ReplayConfig) -> list[str]:
    errors = []
    if not (isinstance(cfg.weight, (int, float)) and math.isfinite(cfg.weight) and 0 <= cfg.weight < 1):
        errors.append(f"replay.weight={cfg.weight!r} must be a number in [0, 1)")
    for name in ("windows", "pool"):
        value = getattr(cfg, name)
        if not (isinstance(value, int) and value >= 1):
            errors.append(f"replay.{name}={value!r} must be an integer >= 1")
    return errors


class ReplayStream:
    """Fixed pool of pre-training windows, served in per-epoch permutations (a pure function of seed and cursor)."""

    def __init__(self, texts: Sequence[str], tokenizer: Any, window: int, pool: int, seed: int):
        if window < 2:
            raise ValueError(f"replay windows need >= 2 tokens, got {window}")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("replay needs a tokenizer with an eos_token")
        self.windows: list[list[int]] = []
        buffer: list[int] = []
        for text in texts:
            buffer.extend(list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos])
            while len(buffer) >= window and len(self.windows) < pool:
                self.windows.append(buffer[:window])
                buffer = buffer[window:]
            if len(self.windows) >= pool:
                break
        if not self.windows:
            raise ValueError(f"the replay texts hold fewer than one window of {window} tokens")
        self.seed = seed

    def __len__(self) -> int:
        return len(self.windows)

    def chunks(self, policy, start: int, count: int, micro_batch: int, weight: float) -> list[Chunk]:
        """Windows [start, start + count) of the stream as chunks whose token-sum losses / normalizer sum to
        weight · L_lm (every token after a window's first is a label)."""
        idx = stream_indices(len(self.windows), self.seed, start, count)
        out = []
        for i in range(0, len(idx), micro_batch):
            part = [self.windows[j] for j in idx[i:i + micro_batch]]
            enc = policy.collate([w[:1] for w in part], [w[1:] for w in part], max_length=None, add_eos=False)
            enc["n_tokens"] = int((enc["labels"][:, 1:] != -100).sum())
            enc["replay"] = True
            out.append(enc)
        total = sum(c["n_tokens"] for c in out)
        for c in out:
            c["normalizer"] = float(total) / weight
        return out

"""Supervised fine-tuning = behaviour cloning on the env's demonstrations.

Loss of an effective batch B (token-mean cross-entropy on completion tokens only; prompt and padding are masked):

    L(B) = -(1 / N_B) Σ_{i∈B} Σ_{t∈completion_i} log π_θ(c_{i,t} | p_i, c_{i,<t}),   N_B = # completion tokens in B

(EOS after the completion counts as a completion token; in a multi-turn demonstration the env's replies are context,
not completion tokens: see ``SFTRegime.segments``). The batch is cut into chunks of ``micro_batch`` examples and
every chunk carries N_B as its ``normalizer``, so chunk losses sum to L(B) (see agents/optim.py).

Data order: an infinite stream that concatenates per-epoch permutations of the training set, permutation e drawn
from a generator seeded with (seed, e). Step t consumes the next ``micro_batch * grad_accum`` examples, so the whole
data-order state is one integer (``cursor``, examples consumed); changing the batch size on resume continues the
same stream. ``full_batch=True`` makes every step the whole training set in index order (exact full-batch GD).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from agents.optim import split

Chunk = dict[str, Any]  # input_ids, attention_mask, labels [b, T]; normalizer: float (N_B); n_tokens: int


def make_chunks(policy, prompts: Sequence[str], completions: Sequence[str | Sequence[tuple[str, bool]]],
                micro_batch: int, max_length: int | None) -> list[Chunk]:
    """Encode (prompt, completion) pairs into chunks whose token-sum losses, divided by the batch's total
    completion-token count, sum to the batch's token-mean loss (a completion may be ``(text, is_env)`` segments:
    env tokens are neither targets nor counted; see LMPolicy.encode)."""
    pairs = list(zip(prompts, completions))
    chunks = []
    for part in split(pairs, micro_batch):
        enc = policy.encode([p for p, _ in part], [c for _, c in part], max_length=max_length)
        enc["n_tokens"] = int((enc["labels"][:, 1:] != -100).sum())
        chunks.append(enc)
    total = sum(c["n_tokens"] for c in chunks)
    if total == 0:
        raise ValueError("the batch has no completion tokens (all truncated away?)")
    for c in chunks:
        c["normalizer"] = float(total)
    return chunks


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """Permutation of range(n) for one epoch, a pure function of (seed, epoch)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint64)
    gen = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
    return torch.randperm(n, generator=gen).tolist()


def stream_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items [start, start + count) of the infinite stream perm_0 ++ perm_1 ++ ... over range(n)."""
    out = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = epoch_permutation(n, seed, epoch)
        take = perm[offset: offset + count - len(out)]
        out.extend(take)
        pos += len(take)
    return out


@dataclass
class SFTRegime:
    """Behaviour cloning on ``tasks`` (anything with ``.prompt`` and ``.demonstration``, e.g. envs.core.Task).

    ``segments`` (e.g. the env's ``demonstration_segments``): a task's demonstrated episode as ``(text, is_env)``
    pairs, the prompt first; env text after the prompt (a multi-turn episode's tool replies) is context, not a
    target, so the loss is the token-mean over the policy's own tokens only. None: the demonstration is all target."""

    tasks: Sequence[Any]
    micro_batch: int = 4
    grad_accum: int = 4
    full_batch: bool = False
    seed: int = 0
    max_length: int | None = 128
    cursor: int = 0                      # examples consumed so far (data-order state)
    replay: Any = None                   # agents.replay.ReplayStream of pre-training windows, or None
    replay_weight: float = 0.0           # α of (1 − α) L_task + α L_lm (agents/replay.py)
    replay_windows: int = 0              # replay windows per step
    replay_cursor: int = 0               # replay windows consumed so far
    segments: Callable[[Any], Sequence[tuple[str, bool]]] | None = None   # the env's demonstration_segments
    _full: list[Chunk] | None = field(default=None, repr=False)
    _probe: tuple[tuple[int, int], list[Chunk]] | None = field(default=None, repr=False)  # (size, seed) -> chunks

    def __post_init__(self) -> None:
        if len(self.tasks) == 0:
            raise ValueError("SFTRegime needs at least one training task")
        if self.micro_batch < 1 or self.grad_accum < 1:
            raise ValueError("micro_batch and grad_accum must be >= 1")
        if self.replay is not None and not (0 < self.replay_weight < 1 and self.replay_windows >= 1):
            raise ValueError("replay needs 0 < replay_weight < 1 and replay_windows >= 1")

    @property
    def batch_size(self) -> int:
        """Examples per optimizer step."""
        return len(self.tasks) if self.full_batch else self.micro_batch * self.grad_accum

    def loss(self, policy, batch: Chunk) -> torch.Tensor:
        """Σ_{completion tokens in chunk} -log π_θ / N_B  (N_B = batch["normalizer"])."""
        logp, mask = policy.token_logprobs(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return -(logp * mask).sum() / batch["normalizer"]

    def loss_and_stats(self, policy, batch: Chunk) -> tuple[torch.Tensor, dict[str, float]]:
        """``loss``; with replay also the two parts unweighted (train/task_loss = L_task, train/replay_loss = L_lm)."""
        loss = self.loss(policy, batch)
        if self.replay is None:
            return loss, {}
        part = "replay" if batch.get("replay") else "task"
        weight = self.replay_weight if part == "replay" else 1 - self.replay_weight
        return loss, {f"train/{part}_loss": float(loss.detach()) / weight}

    def chunks_for(self, policy, indices: Sequence[int], chunk: int = 0) -> list[Chunk]:
        """Chunks of ``chunk`` examples (0 = the micro-batch) of the tasks at ``indices``."""
        tasks = [self.tasks[i] for i in indices]
        return make_chunks(policy, [t.prompt for t in tasks], [self._completion(t) for t in tasks],
                           chunk or self.micro_batch, self.max_length)

    def _completion(self, task) -> str | list[tuple[str, bool]]:
        """The demonstration, or its segments after the prompt when some of them are env text."""
        if self.segments is None:
            return task.demonstration
        segs = list(self.segments(task))
        if not segs or segs[0] != (task.prompt, True):
            raise ValueError(f"demonstration segments of {getattr(task, 'task_id', task)!r} must start with the "
                             "prompt as env text")
        rest = segs[1:]
        return "".join(t for t, _ in rest) if not any(is_env for _, is_env in rest) else rest

    def _mixed(self, policy, chunks: list[Chunk], replay_start: int, chunk: int = 0) -> list[Chunk]:
        """Task chunks reweighted by (1 − α) plus replay windows [replay_start, + replay_windows) weighted by α, in
        chunks of ``chunk`` windows (0 = the micro-batch)."""
        if self.replay is None:
            return chunks
        task = [{**c, "normalizer": c["normalizer"] / (1 - self.replay_weight), "replay": False} for c in chunks]
        return task + self.replay.chunks(policy, replay_start, self.replay_windows, chunk or self.micro_batch,
                                         self.replay_weight)

    def next_batch(self, policy, step: int) -> tuple[list[Chunk], dict[str, float]]:
        """Chunks of step ``step``'s effective batch; advances the data cursors."""
        if self.full_batch:
            if self._full is None:  # the same fixed chunks every step (replay: the stream's first windows)
                self._full = self._mixed(policy, self.chunks_for(policy, range(len(self.tasks))), 0)
            chunks = self._full
        else:
            idx = stream_indices(len(self.tasks), self.seed, self.cursor, self.batch_size)
            self.cursor += len(idx)
            chunks = self._mixed(policy, self.chunks_for(policy, idx), self.replay_cursor)
            self.replay_cursor += self.replay_windows if self.replay is not None else 0
        stats = {"train/tokens": float(sum(c["n_tokens"] for c in chunks))}
        return chunks, stats

    def sample_batch(self, policy, generator: torch.Generator) -> list[Chunk]:
        """A fresh training minibatch of the training batch size (without replacement), drawn with ``generator``
        only; for batch sharpness. Under full-batch GD it is a random batch of micro_batch * grad_accum. With
        replay, its replay part starts at a random point of the replay stream."""
        size = min(self.micro_batch * self.grad_accum, len(self.tasks))
        idx = torch.randperm(len(self.tasks), generator=generator)[:size].tolist()
        start = int(torch.randint(0, len(self.replay), (1,), generator=generator)) if self.replay is not None else 0
        return self._mixed(policy, self.chunks_for(policy, idx), start)

    def probe_set(self, policy, size: int, seed: int, chunk: int = 0) -> list[Chunk] | None:
        """The fixed probe set: ``size`` training examples drawn once without replacement by a generator seeded
        with ``seed`` (in index order; the whole training set when size ≥ its size), in chunks of ``chunk`` examples
        (0 = the micro-batch, like a training batch), normalised by its own token count, so the chunk losses sum to
        its token-mean CE whatever the chunking; with replay, weighted (1 − α) beside α times the replay stream's
        first windows, as full-batch GD's objective is, so it is the same objective the optimizer steps on. Encoded
        once per (size, seed, chunk). Full-batch GD and size 0: None (the batch is the probe set)."""
        if self.full_batch or size <= 0:
            return None
        if self._probe is None or self._probe[0] != (size, seed, chunk):
            n = len(self.tasks)
            idx = range(n) if size >= n else \
                sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].tolist())
            self._probe = ((size, seed, chunk), self._mixed(policy, self.chunks_for(policy, idx, chunk), 0, chunk))
        return self._probe[1]

    def extra_parameters(self) -> dict[str, torch.Tensor]:
        return {}

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "replay_cursor": self.replay_cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        self.replay_cursor = int(state.get("replay_cursor", 0))  # absent in checkpoints from before replay

    def extra_state(self) -> None:
        return None  # the data order is the cursor alone

    def load_extra_state(self, state: dict) -> None:
        raise ValueError("SFTRegime keeps no extra state; this checkpoint was written by another regime")

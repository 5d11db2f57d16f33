"""PPO on verifiable rewards (RLVR), our own implementation: TRL 1.16 removed ``PPOTrainer`` and its GRPO trainer
owns the loop, while the probes need the exact surrogate on a frozen rollout buffer.

Rollout (step t, parameters θ_old = θ_t): P prompts from the training stream, each sampled G times with
``policy.generate`` (temperature τ, a generator seeded by (seed, t)), rewards r ∈ [0, 1] from the env verifier.
The policy trained is the sampling policy π^τ_θ = softmax(logits_θ / τ): every log-prob below is tempered, so
rollouts are on-policy (scoring them at τ = 1 while sampling at τ < 1 would optimise a policy that never acted, a
biased gradient; TRL's GRPO divides by τ for the same reason). Greedy evaluation is the same for every τ.
The buffer stores, per completion token, old log-probs log π_old, reference log-probs log π_ref and advantages Â,
all detached. Loss on the buffer (token mean over its N completion tokens; chunks sum to it, see agents/optim.py):

    L(θ) = (1/N) Σ_tokens [ -min(ρ Â, clip(ρ, 1-ε, 1+ε) Â) + β k3(θ) - c_H H_t(θ) ]  (+ c_V (1/N) Σ ½ (V - R)²)
    ρ = exp(log π_θ - log π_old),  k3 = exp(log π_ref - log π_θ) - (log π_ref - log π_θ) - 1  (≥ 0, E = KL(π_θ‖π_ref)),
    H_t = entropy of π_θ(· | prefix) over the vocabulary.

Advantages: ``"group"`` (GRPO / Dr. GRPO baseline) Â_i = r_i - mean_{group}(r) on every token of completion i
(optionally divided by the group std); ``"value"``: a linear value head on the *detached* last hidden state, GAE(γ, λ)
with the reward on the final token, returns R = Â + V. Detaching keeps the value fit out of the policy's Hessian:
∇²_θ L is the Hessian of the policy objective alone. Reference policy: under LoRA the base model with adapters
disabled (no copy; rl/kl is then logged even at β = 0); under full fine-tuning a frozen copy of the initial model
(only when β > 0).
At ρ = 1 (fresh buffer, ``ppo_epochs=1``) clipping is inactive and ∇L is the on-policy policy gradient.

Multi-turn episodes (a ``protocol``, e.g. ArithToolRLVR-v0's calculator; agents.episodes): a turn is sampled (cut
after ``turn_stop`` when it appears), ``reply(turn)`` gives the env's reply (None: the turn was the last), and the next
turn is sampled after prompt + turns + replies, up to ``max_turns``; the reward scores the whole transcript. The
buffer holds the episode as one sequence whose env replies are context, not actions: their tokens are masked like
the prompt's, so they carry no advantage, no KL and no gradient (N counts policy tokens only). Each segment is
tokenized on its own and the log-probs are taken on those ids (a turn is re-encoded from its text), so ρ = 1 holds
exactly at θ_old; the sampler saw the same text, whose tokenization may differ at a segment boundary.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from agents.episodes import TurnProtocol, play
from agents.optim import split
from agents.sft import stream_indices
from agents.tokens import token_stats

ADVANTAGES = ("group", "value")


@dataclass(frozen=True)
class PPOConfig:
    """PPO / GRPO-style RLVR settings. Buffer = prompts_per_step * group_size completions per rollout."""

    prompts_per_step: int = 8
    """Prompts per rollout."""
    group_size: int = 4
    """Completions sampled per prompt (the group of a group baseline)."""
    max_new_tokens: int = 64
    """Sampled tokens per completion (room for ArithRLVR's column working, ~45 tokens for 2 digits)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (> 0)."""
    clip_eps: float = 0.2
    """PPO ratio clip ε: ρ is clipped to [1 - ε, 1 + ε]."""
    kl_coef: float = 0.05
    """β of the k3 KL penalty to the reference policy (0 = no penalty)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient c_H."""
    advantage: str = "group"
    """group (reward minus the group mean, GRPO-style) or value (value head + GAE)."""
    scale_by_std: bool = False
    """Group advantages divided by the group std (GRPO) instead of centred only (Dr. GRPO)."""
    ppo_epochs: int = 1
    """Optimizer steps per rollout buffer (1 = on-policy, ρ = 1 at θ)."""
    gamma: float = 1.0
    """GAE discount γ (value advantages)."""
    gae_lambda: float = 0.95
    """GAE λ (value advantages)."""
    vf_coef: float = 0.5
    """Value-loss coefficient c_V (value advantages)."""
    curriculum_window: int = 0
    """0 = off. > 0: rollouts draw from the env's difficulty ladder (``reset(options={"difficulty": k})``), the level
    moved by envs.curriculum's rule over blocks of this many episodes (success ≥ 0.8: harder, ≤ 0.2: easier)."""
    curriculum_start: int = 0
    """The curriculum's first level (0 = the easiest)."""


def config_errors(cfg: PPOConfig) -> list[str]:
    errors = []
    for name in ("prompts_per_step", "group_size", "max_new_tokens", "ppo_epochs"):
        if getattr(cfg, name) < 1:
            errors.append(f"ppo.{name}={getattr(cfg, name)} must be >= 1")
    if cfg.advantage not in ADVANTAGES:
        errors.append(f"ppo.advantage={cfg.advantage!r} is unknown; choose one of {ADVANTAGES}")
    if cfg.advantage == "group" and cfg.group_size < 2:
        errors.append("ppo.advantage='group' needs group_size >= 2 (a group of one has zero advantage)")
    if not cfg.temperature > 0:
        errors.append(f"ppo.temperature={cfg.temperature} must be > 0 (rollouts are sampled)")
    if not cfg.clip_eps > 0:
        errors.append(f"ppo.clip_eps={cfg.clip_eps} must be > 0")
    for name in ("kl_coef", "entropy_coef", "vf_coef"):
        if getattr(cfg, name) < 0:
            errors.append(f"ppo.{name}={getattr(cfg, name)} must be >= 0")
    if not (0 <= cfg.gamma <= 1 and 0 <= cfg.gae_lambda <= 1):
        errors.append("ppo.gamma and ppo.gae_lambda must be in [0, 1]")
    if cfg.curriculum_window < 0 or cfg.curriculum_start < 0:
        errors.append("ppo.curriculum_window and ppo.curriculum_start must be >= 0")
    return errors


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = False) -> torch.Tensor:
    """Â_i = r_i - mean of its group (consecutive blocks of ``group_size``), optionally / (std + 1e-6)."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + 1e-6)
    return adv.reshape(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's masked (completion) positions.

    rewards [B] land on the last masked position of each row; values/mask [B, T]. δ_t = r_t + γ V_{t+1} - V_t
    (V = 0 after the last token), Â_t = δ_t + γ λ Â_{t+1}; returns (Â, R = Â + V), zero off the mask."""
    B, T = mask.shape
    adv = torch.zeros_like(values)
    for b in range(B):
        pos = mask[b].nonzero().flatten().tolist()
        running, next_v = 0.0, 0.0
        for j, t in enumerate(reversed(pos)):
            r = float(rewards[b]) if j == 0 else 0.0
            delta = r + gamma * next_v - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b, t] = running
            next_v = float(values[b, t])
    return adv, (adv + values) * mask


def forward_stats(model, chunk: dict, want_hidden: bool = False, temperature: float = 1.0):
    """One forward: (log π^τ(label) [B,T-1], entropy [B,T-1], mask [B,T-1], last hidden state [B,T-1,d] or None)
    of the tempered policy π^τ = softmax(logits / τ); ``agents.tokens.token_stats`` on a chunk."""
    s = token_stats(model, chunk["input_ids"], chunk["attention_mask"], chunk["labels"], entropy=True,
                    hidden=want_hidden, temperature=temperature)
    return s.logp, s.entropy, s.mask, s.hidden


def _mix(*ints: int) -> int:
    return int(np.random.SeedSequence(list(ints)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class PPORegime:
    """RLVR by PPO on ``tasks`` scored by ``score_fn(completions, answers) -> rewards in [0, 1]``."""

    def __init__(self, policy, tasks: Sequence[Any], score_fn: Callable[[list[str], list[str]], Sequence[float]],
                 config: PPOConfig = PPOConfig(), micro_batch: int = 4, seed: int = 0,
                 max_length: int | None = 128, levels: Sequence[Sequence[Any]] | None = None,
                 curriculum: Any = None, protocol: TurnProtocol | None = None) -> None:
        """``levels`` + ``curriculum`` (an envs.curriculum.Curriculum over ``len(levels)`` levels): each rollout
        draws its prompts from ``levels[curriculum.level]`` (each level its own data stream) and reports its
        rewards to the curriculum, which may move the level for the next rollout; ``tasks`` is then unused.
        ``protocol``: multi-turn episodes (module docstring; agents.episodes.TurnProtocol.of(env))."""
        errors = config_errors(config)
        if errors:
            raise ValueError("; ".join(errors))
        if len(tasks) == 0:
            raise ValueError("PPORegime needs at least one training task")
        if (levels is None) != (curriculum is None):
            raise ValueError("a curriculum needs its levels' tasks, and levels need a curriculum")
        if levels is not None and (len(levels) != curriculum.config.n_levels or not all(len(t) for t in levels)):
            raise ValueError(f"the curriculum has {curriculum.config.n_levels} levels; got {len(levels)} task lists "
                             "(each needs at least one task)")
        self.protocol = protocol
        self.tasks, self.score_fn, self.config = list(tasks), score_fn, config
        self.levels = [list(t) for t in levels] if levels is not None else None
        self.curriculum = curriculum
        self.level_cursors = [0] * len(self.levels) if self.levels is not None else []
        self.micro_batch, self.seed, self.max_length = micro_batch, seed, max_length
        self.cursor = 0                        # prompts consumed (data-order state)
        self.buffer: list[dict] | None = None  # chunks of the current rollout (reused for ppo_epochs steps)
        self.lora = policy.uses_lora
        self.reference = None
        if config.kl_coef > 0 and not self.lora:
            self.reference = copy.deepcopy(policy.model).eval().requires_grad_(False)
        self.value_head = None
        if config.advantage == "value":
            hidden = policy.model.config.hidden_size
            dtype = next(policy.model.parameters()).dtype
            self.value_head = torch.nn.Linear(hidden, 1, dtype=dtype, device=policy.device)
            with torch.no_grad():  # zero init: V = 0 at the start, and no draw from the training RNG
                self.value_head.weight.zero_()
                self.value_head.bias.zero_()

    @property
    def has_reference(self) -> bool:
        """KL to the reference is computed when penalised, and under LoRA always (adapters off: free to monitor)."""
        return self.config.kl_coef > 0 or self.lora

    # ------------------------------------------------------------------ rollouts
    def _reference_logprobs(self, policy, chunk: dict) -> torch.Tensor:
        if self.lora:
            with policy.model.disable_adapter():
                return forward_stats(policy.model, chunk, temperature=self.config.temperature)[0]
        return forward_stats(self.reference, chunk, temperature=self.config.temperature)[0]

    def rollout(self, policy, drawn: Sequence[Any], generator: torch.Generator) -> tuple[list[dict], dict]:
        """Sample (each of the ``drawn`` tasks ``group_size`` times), score and freeze one buffer; returns (chunks,
        env/rl metrics). Under a multi-turn protocol rl/response_len counts the env's reply tokens too."""
        cfg = self.config
        tasks = [t for t in drawn for _ in range(cfg.group_size)]
        targets, turns = None, None
        if self.protocol is not None:
            ep = play(policy, [t.prompt for t in tasks], self.protocol, cfg.max_new_tokens, cfg.temperature,
                      generator)
            texts, prompt_ids, completion_ids = ep.texts, ep.prompt_ids, ep.completion_ids
            targets, finished, turns = ep.targets, ep.finished, ep.turns
        else:
            gen = policy.generate([t.prompt for t in tasks], max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, generator=generator)
            texts, prompt_ids, completion_ids, finished = gen.texts, gen.prompt_ids, gen.completion_ids, gen.finished
        rewards = torch.tensor(np.asarray(self.score_fn(texts, [t.answer for t in tasks]), dtype=np.float64),
                               dtype=torch.float32)
        seq_adv = group_advantages(rewards, cfg.group_size, cfg.scale_by_std) if cfg.advantage == "group" else None
        chunks = []
        with torch.no_grad():
            for rows in split(list(range(len(tasks))), self.micro_batch):
                chunk = policy.collate([prompt_ids[i] for i in rows], [completion_ids[i] for i in rows],
                                       max_length=self.max_length, add_eos=False,
                                       targets=None if targets is None else [targets[i] for i in rows])
                logp, _, mask, hidden = forward_stats(policy.model, chunk, want_hidden=self.value_head is not None,
                                                      temperature=cfg.temperature)
                chunk["old_logp"] = logp
                chunk["ref_logp"] = self._reference_logprobs(policy, chunk) if self.has_reference else None
                r = rewards[rows]
                if seq_adv is not None:
                    chunk["advantages"] = seq_adv[rows][:, None] * mask
                    chunk["returns"] = None
                else:
                    values = self.value_head(hidden.float()).squeeze(-1) * mask
                    chunk["advantages"], chunk["returns"] = gae(r, values, mask, cfg.gamma, cfg.gae_lambda)
                chunk["n_tokens"] = int(mask.sum())
                chunk["rewards"], chunk["texts"] = r, [texts[i] for i in rows]
                chunks.append(chunk)
        total = sum(c["n_tokens"] for c in chunks)
        for c in chunks:
            c["normalizer"] = float(total)
        groups = rewards.view(-1, cfg.group_size)
        metrics = {
            "env/reward_mean": float(rewards.mean()),
            "env/reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "env/accuracy": float((rewards >= 1.0).float().mean()),
            "rl/response_len": float(np.mean([len(c) for c in completion_ids])),
            "rl/finished_frac": float(np.mean(finished)) if finished else float("nan"),
            "rl/frac_zero_std": float((groups.std(dim=1) == 0).float().mean()) if cfg.group_size > 1 else 1.0,
        }
        if turns is not None:
            metrics["rl/turns"] = float(np.mean(turns))
        return chunks, metrics

    def _pool(self) -> tuple[list, int, int]:
        """(tasks, stream seed, stream position) that the next rollout draws from: the training set, or under a
        curriculum the current level's tasks, each level streaming its own permutations (seed mixed with the level)."""
        if self.curriculum is None:
            return self.tasks, self.seed, self.cursor
        level = self.curriculum.level
        return self.levels[level], _mix(self.seed, level), self.level_cursors[level]

    def next_batch(self, policy, step: int) -> tuple[list[dict], dict]:
        """A new rollout every ``ppo_epochs`` steps (sampling generator seeded by (seed, step)), else the same
        buffer. Under a curriculum its rewards then go to the curriculum, which may move the level."""
        if self.buffer is not None and step % self.config.ppo_epochs != 0:
            return self.buffer, {}
        tasks, stream_seed, start = self._pool()
        idx = stream_indices(len(tasks), stream_seed, start, self.config.prompts_per_step)
        self.cursor += len(idx)
        generator = torch.Generator().manual_seed(_mix(self.seed, step, 7))
        self.buffer, metrics = self.rollout(policy, [tasks[i] for i in idx], generator)
        if self.curriculum is not None:
            level = self.curriculum.level
            self.level_cursors[level] += len(idx)
            self.curriculum.update(torch.cat([c["rewards"] for c in self.buffer]).tolist())
            metrics.update({"curriculum/level_played": float(level), **self.curriculum.metrics()})
        return self.buffer, metrics

    def sample_batch(self, policy, generator: torch.Generator) -> list[dict]:
        """A fresh rollout buffer (prompts and samples drawn with ``generator`` only; under a curriculum from the
        current level, which it leaves as it is), for batch sharpness."""
        tasks = self._pool()[0]
        idx = torch.randint(len(tasks), (self.config.prompts_per_step,), generator=generator).tolist()
        return self.rollout(policy, [tasks[i] for i in idx], generator)[0]

    def probe_set(self, policy, size: int, seed: int, chunk: int = 0) -> None:
        """None: RLVR has no fixed training set; its objective is the surrogate on the current rollout buffer,
        which is therefore what probe/lambda_max measures (= probe/lambda_max_batch)."""
        return None

    # ------------------------------------------------------------------ loss
    def loss_and_stats(self, policy, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Chunk loss (see module docstring) and its token-sum stats / N (they sum over chunks to buffer means)."""
        cfg = self.config
        logp, entropy, mask, hidden = forward_stats(policy.model, batch, want_hidden=self.value_head is not None,
                                                    temperature=cfg.temperature)
        n = batch["normalizer"]
        adv = batch["advantages"]
        ratio = torch.exp(logp - batch["old_logp"])
        clipped = torch.clamp(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps)
        per_token = -torch.minimum(ratio * adv, clipped * adv)
        stats = {}
        if batch["ref_logp"] is not None:
            d = batch["ref_logp"] - logp
            kl = torch.exp(d) - d - 1
            if cfg.kl_coef:
                per_token = per_token + cfg.kl_coef * kl
            stats["rl/kl"] = float((kl.detach() * mask).sum() / n)
        if cfg.entropy_coef:
            per_token = per_token - cfg.entropy_coef * entropy
        loss = (per_token * mask).sum() / n
        if self.value_head is not None:
            values = self.value_head(hidden.detach().float()).squeeze(-1)
            v_loss = (0.5 * (values - batch["returns"]) ** 2 * mask).sum() / n
            loss = loss + cfg.vf_coef * v_loss
            stats["rl/value_loss"] = float(v_loss.detach())
        stats["rl/entropy"] = float((entropy.detach() * mask).sum() / n)
        stats["rl/clip_frac"] = float((((ratio.detach() - 1).abs() > cfg.clip_eps) & mask).sum() / n)
        return loss, stats

    def loss(self, policy, batch: dict) -> torch.Tensor:
        """The exact objective the optimizer steps on, for one chunk of the buffer."""
        return self.loss_and_stats(policy, batch)[0]

    # ------------------------------------------------------------------ state
    def extra_parameters(self) -> dict[str, torch.Tensor]:
        if self.value_head is None:
            return {}
        return {f"value_head.{k}": v for k, v in self.value_head.named_parameters()}

    def state_dict(self) -> dict:
        if self.curriculum is None:
            return {"cursor": self.cursor}
        return {"cursor": self.cursor, "level_cursors": list(self.level_cursors),
                "curriculum": self.curriculum.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        if self.curriculum is not None:
            if "curriculum" not in state:
                raise ValueError("this checkpoint was written without a curriculum")
            self.level_cursors = [int(c) for c in state["level_cursors"]]
            self.curriculum.load_state_dict(state["curriculum"])

    def extra_state(self):
        """The live rollout buffer, needed to resume in the middle of its ppo_epochs."""
        return {"buffer": self.buffer} if self.config.ppo_epochs > 1 and self.buffer is not None else None

    def load_extra_state(self, state) -> None:
        self.buffer = state["buffer"]

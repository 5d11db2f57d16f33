"""Batched reset/step over many single-turn episodes of one text-task env, without one env object per slot.

``gymnasium.vector.SyncVectorEnv`` (``gym.make_vec(id, num_envs=n, vectorization_mode="sync")``) works with these
envs too, but pays for n env objects, wrapper stacks and autoreset bookkeeping per step. Episodes here are
independent single steps, so a batch is just n task indices drawn at once and n verifier calls: see
``experiments/bench/env_throughput.py`` for the measured ratio. Tasks can be repeated ``group_size`` times in a
row (GRPO-style groups that share one task).

``AsyncVectorEnv`` needs ``vector_kwargs={"shared_memory": False}``: with shared memory, gymnasium 1.4 decodes
non-Box observations from the buffer once at construction (cf. Farama-Foundation/Gymnasium#1164), so Text
observations stay the initial all-"0" string forever.

>>> import envs
>>> batch = TaskBatch("ArithRLVR-v0", batch_size=4, seed=0)
>>> prompts, info = batch.reset()
>>> batch.step(info["demonstration"])[0].tolist()
[1.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# envs/__init__.py (the registry) never imports this module, so importing the package here is no cycle
from envs import make_unwrapped
from envs.core import TextTaskEnv, check_split


class TaskBatch:
    """``batch_size`` single-turn episodes at a time.

    Args:
        env: an env id (made with ``env_kwargs``) or an env whose ``unwrapped`` is a TextTaskEnv.
        batch_size: episodes per ``reset``; must be a multiple of ``group_size``.
        group_size: each drawn task fills ``group_size`` consecutive slots.
        split: split to draw tasks from.
        seed: seeds the index generator (``np.random.default_rng(seed)``).
    """

    def __init__(self, env: str | Any, batch_size: int, *, group_size: int = 1, split: str = "train",
                 seed: int | None = None, **env_kwargs: Any):
        if isinstance(env, str):
            env = make_unwrapped(env, **env_kwargs)
        elif env_kwargs:
            raise ValueError("env_kwargs only apply when env is an id")
        self.env: TextTaskEnv = env.unwrapped
        if not isinstance(self.env, TextTaskEnv):
            raise TypeError(f"TaskBatch needs a TextTaskEnv, got {type(self.env).__name__}")
        if batch_size < 1 or group_size < 1 or batch_size % group_size:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of group_size ({group_size})")
        self.batch_size, self.group_size, self.split = batch_size, group_size, check_split(split)
        self.rng = np.random.default_rng(seed)
        self._answers: list[str] | None = None

    def reset(self, seed: int | None = None) -> tuple[list[str], dict[str, list]]:
        """Draw ``batch_size / group_size`` tasks; returns prompts and per-slot lists of answer, demonstration,
        task_id."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        n = self.batch_size // self.group_size
        env, split = self.env, self.split
        if env.mode == "dataset":
            dataset = env.tasks(split)
            tasks = [dataset[i] for i in self.rng.integers(len(dataset), size=n).tolist()]
        else:
            tasks = [env.task(i, split) for i in self.rng.integers(2**31, size=n).tolist()]
        if self.group_size > 1:
            tasks = [t for t in tasks for _ in range(self.group_size)]
        self._answers = [t.answer for t in tasks]
        info = {
            "answer": list(self._answers),
            "demonstration": [t.demonstration for t in tasks],
            "task_id": [t.task_id for t in tasks],
        }
        return [t.prompt for t in tasks], info

    def step(self, completions: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, dict[str, list]]:
        """Score one completion per slot: (rewards float64[B], terminated bool[B] (all True), info lists of
        correct, format_ok, parsed, error). Bad completions score 0 with an error, as in ``env.step``."""
        if self._answers is None:
            raise RuntimeError("call reset() before step()")
        if len(completions) != len(self._answers):
            raise ValueError(f"{len(completions)} completions for a batch of {len(self._answers)}")
        check = self.env.check
        verdicts = [check(c, a) for c, a in zip(completions, self._answers)]
        self._answers = None  # every episode has terminated: the next step needs a reset
        rewards = np.fromiter((v.reward for v in verdicts), dtype=np.float64, count=len(verdicts))
        info = {
            "correct": [v.correct for v in verdicts],
            "format_ok": [v.format_ok for v in verdicts],
            "parsed": [v.parsed for v in verdicts],
            "error": [v.error for v in verdicts],
        }
        return rewards, np.ones(len(verdicts), dtype=bool), info

"""Verifiable text-task environments; importing this package registers every env id (this file is the registry).

>>> import gymnasium as gym, envs
>>> env = gym.make("ArithRLVR-v0")
>>> prompt, info = env.reset(seed=0)
>>> env.step(info["demonstration"])[1]
1.0

Ids (``gym.make(id, **kwargs)`` overrides any knob; also reachable as ``gym.make("envs:<id>")``):

* ``ArithRLVR-v0``       1-2 digit addition/subtraction, one operation (easy enough for a tiny model's SFT).
* ``ArithRLVR-hard-v0``  1-3 digits, ``+ - *``, 1-3 operations, parentheses, 20% word problems, negatives.
* ``InstructRLVR-v0``    programmatically checked instruction following (7 families).
* ``AlpacaSFT-v0``       Alpaca-format instruction data, soft token-F1 reward (NOT exactly verifiable).

Suite ids beyond the four single-turn ones above (``SUITE_IDS``; ``ENV_IDS`` keeps the four):

* ``ReasoningGym-v0``    any reasoning-gym task: ``gym.make("ReasoningGym-v0", task="chain_sum", **config)``.
* ``ArithToolRLVR-v0``   multi-turn arithmetic with a calculator tool (``<calc>12*7</calc>``), see envs.tool_arith.

The verifiable ids take ``answer_format="strict"`` (default: exactly ``Answer: <answer>``) or ``"lenient"`` (the
usual other ways to write a correct answer; still 0 for hacks and conflicting answers), see :mod:`envs.verify`.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import lru_cache
from typing import Any

import gymnasium as gym
import numpy as np

from envs.arith import HARD  # cheap: pure Python, no heavy dependencies
from envs.core import Task, TextTaskEnv
from envs.verify import completion_text

# id -> (entry point, registered kwargs). No max_episode_steps: episodes are single-step and terminate
# themselves; a TimeLimit(1) would also set truncated=True on the terminating step.
_IDS = {
    "ArithRLVR-v0": ("envs.arith:ArithEnv", {}),
    "ArithRLVR-hard-v0": ("envs.arith:ArithEnv", asdict(HARD)),
    "InstructRLVR-v0": ("envs.instruct:InstructEnv", {}),
    "AlpacaSFT-v0": ("envs.alpaca:AlpacaEnv", {}),
}
# multi-turn and library envs: registered alike, listed apart so ENV_IDS stays the single-turn suite
_SUITE_IDS = {
    "ReasoningGym-v0": ("envs.reasoning_gym:ReasoningGymEnv", {}),
    "ArithToolRLVR-v0": ("envs.tool_arith:ArithToolEnv", {}),
}
for _env_id, (_entry_point, _kwargs) in {**_IDS, **_SUITE_IDS}.items():
    if _env_id not in gym.registry:  # re-importing (e.g. importlib.reload) must not warn about overrides
        gym.register(id=_env_id, entry_point=_entry_point, kwargs=_kwargs)

ENV_IDS = tuple(_IDS)
SUITE_IDS = tuple(_SUITE_IDS)


def make_unwrapped(env_id: str, **env_kwargs: Any) -> TextTaskEnv:
    """``gym.make(env_id, **env_kwargs).unwrapped`` with a clear error for unknown ids."""
    if env_id not in gym.registry:
        raise ValueError(f"unknown env id {env_id!r}; registered text-task ids: {', '.join(ENV_IDS)}")
    env = gym.make(env_id, disable_env_checker=True, **env_kwargs).unwrapped
    if not isinstance(env, TextTaskEnv):
        raise ValueError(f"{env_id!r} is not a TextTaskEnv")
    return env


def load_tasks(env_id: str, split: str = "train", n: int | None = None, **env_kwargs: Any) -> list[Task]:
    """Dataset-mode tasks of ``env_id``: the first ``n`` distinct problems of ``split`` (see TextTaskEnv.tasks)."""
    return make_unwrapped(env_id, **env_kwargs).tasks(split, n)


@lru_cache(maxsize=16)
def _cached_env(env_id: str) -> TextTaskEnv:
    return make_unwrapped(env_id)


def score_batch(env_id_or_env: str | gym.Env, completions: list, answers: list[str]) -> np.ndarray:
    """Verifier rewards (float64 array in [0, 1]) of ``completions[i]`` against ``answers[i]``; never raises on
    bad completions. An id uses that id's default verifier; pass an env to use its own settings."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    if isinstance(env_id_or_env, str):
        env = _cached_env(env_id_or_env)
    else:
        env = env_id_or_env.unwrapped
        if not isinstance(env, TextTaskEnv):
            raise ValueError(f"expected a TextTaskEnv (or its id), got {type(env).__name__}")
    score = env.score
    return np.fromiter((score(c, a) for c, a in zip(completions, answers)), dtype=np.float64, count=len(answers))



def make_trl_reward(env_id: str, **env_kwargs: Any):
    """A TRL reward function ``f(prompts, completions, answer, **kw) -> list[float]`` scoring with ``env_id``'s
    verifier (``env_kwargs`` configure the env). The dataset needs an ``answer`` column; TRL passes every
    dataset column as a keyword list, which ``**kw`` absorbs. ``f.__name__`` is what TRL logs under
    ``rewards/<name>/mean``.

    >>> f = make_trl_reward("ArithRLVR-v0")
    >>> f(prompts=["Compute 1+2. "], completions=["1+2=3\\nAnswer: 3"], answer=["3"])
    [1.0]
    """
    score = make_unwrapped(env_id, **env_kwargs).score

    def reward(prompts: list, completions: list, answer: list[str], **kwargs: Any) -> list[float]:
        if len(completions) != len(answer):
            raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
        return [score(completion_text(c), a) for c, a in zip(completions, answer)]

    reward.__name__ = reward.__qualname__ = env_id.split("-v")[0].replace("-", "_").lower() + "_reward"
    return reward


__all__ = ["ENV_IDS", "SUITE_IDS", "Task", "TextTaskEnv", "load_tasks", "make_trl_reward", "make_unwrapped",
           "score_batch"]

"""Numeric view of a text-task env for stable-baselines3 (which cannot take ``spaces.Text``).

SB3 only accepts Box/Discrete/MultiDiscrete/MultiBinary spaces, so :class:`AnswerChoiceView` turns one text
episode into a contextual bandit:

* observation: ``MultiDiscrete([len(charset) + 1] * obs_len)``, the ids of the prompt's first ``obs_len`` chars
  (0 = padding or a char outside the charset). SB3 one-hot encodes MultiDiscrete observations itself.
* action: ``Discrete(len(answers))``; action ``k`` submits ``env.format_answer(answers[k])`` (``"Answer: <k-th>"``).

The reward is the wrapped env's verifier reward, unchanged. gymnasium's ``FlattenObservation`` would give a
``Box`` of char ids instead; MultiDiscrete is used because SB3 then sees categorical inputs, not magnitudes.

>>> import gymnasium as gym, envs
>>> env = AnswerChoiceView(gym.make("ArithRLVR-v0", min_digits=1, max_digits=1, ops="+"), obs_len=16)
>>> obs, info = env.reset(seed=0)
>>> env.step(env.answers.index(info["answer"]))[1]
1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.core import TextTaskEnv


def default_answers(env: TextTaskEnv, n_tasks: int = 500) -> list[str]:
    """Distinct answers of train tasks ``0..n-1`` (n = min(n_tasks, train split size)), sorted numerically when
    they are all integers."""
    answers = sorted({env.task(i, "train").answer for i in range(min(n_tasks, env.split_size("train")))})
    try:
        return sorted(answers, key=int)
    except ValueError:
        return answers


class AnswerChoiceView(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Char-id observations and a Discrete choice among ``answers`` (see module docstring).

    Args:
        env: an env whose ``unwrapped`` is a :class:`~envs.core.TextTaskEnv` (e.g. from ``gym.make``).
        answers: the candidate answers; default :func:`default_answers`. Tasks whose answer is not listed can only
            score what the verifier gives a wrong answer (0 for the exact envs).
        obs_len: prompt chars kept in the observation.
    """

    def __init__(self, env: gym.Env, answers: Sequence[str] | None = None, obs_len: int = 64):
        gym.utils.RecordConstructorArgs.__init__(self, answers=answers, obs_len=obs_len)
        gym.Wrapper.__init__(self, env)
        text_env = env.unwrapped
        if not isinstance(text_env, TextTaskEnv):
            raise TypeError(f"AnswerChoiceView needs a TextTaskEnv, got {type(text_env).__name__}")
        if obs_len < 1:
            raise ValueError(f"obs_len must be >= 1, got {obs_len}")
        self.answers = list(default_answers(text_env) if answers is None else answers)
        if not self.answers:
            raise ValueError("answers must not be empty")
        self.completions = [text_env.format_answer(a) for a in self.answers]
        charset = sorted(text_env.observation_space.character_set)
        self._char_id = {c: i + 1 for i, c in enumerate(charset)}
        self.obs_len = obs_len
        self.observation_space = spaces.MultiDiscrete(np.full(obs_len, len(charset) + 1, dtype=np.int64))
        self.action_space = spaces.Discrete(len(self.answers))

    def encode(self, prompt: str) -> np.ndarray:
        """Char ids of ``prompt[:obs_len]``, zero-padded to ``obs_len``."""
        ids = np.zeros(self.obs_len, dtype=np.int64)
        get = self._char_id.get
        ids[: min(len(prompt), self.obs_len)] = [get(c, 0) for c in prompt[: self.obs_len]]
        return ids

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        prompt, info = self.env.reset(seed=seed, options=options)
        return self.encode(prompt), info

    def step(self, action):
        k = int(action)
        if not 0 <= k < len(self.completions):
            raise ValueError(f"action {action!r} outside Discrete({len(self.completions)})")
        _, reward, terminated, truncated, info = self.env.step(self.completions[k])
        return np.zeros(self.obs_len, dtype=np.int64), reward, terminated, truncated, info

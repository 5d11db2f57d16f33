"""Success-driven difficulty schedule for RL runs: which ``reset(options={"difficulty": k})`` level to train on.

Rule (documented, tested): the scheduler collects the outcomes of the episodes played at the current level in
blocks of ``window``. When a block is full, with ``s`` its success rate:

* ``s >= raise_at`` and a harder level exists -> level + 1;
* ``s <= lower_at`` and an easier level exists -> level - 1;
* otherwise stay;

and the block is cleared either way. Non-overlapping blocks and the gap between ``lower_at`` and ``raise_at`` are
the hysteresis: a policy at 50 % never moves (a block of 64 Bernoulli(0.5) outcomes reaches 0.8 with probability
about 1e-6; a sliding window would test that tail after every episode), and every level gets ``window`` fresh
episodes before the next move. An episode succeeds when its reward is at least ``success_reward`` (1.0: a
verified answer).

>>> c = Curriculum(n_levels=3, window=4)
>>> c.update([1.0, 1.0, 1.0, 1.0])
1
>>> c.options()
{'difficulty': 1}
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CurriculumConfig:
    """The schedule's knobs (see the module docstring for the rule)."""

    n_levels: int
    start: int = 0
    window: int = 64
    raise_at: float = 0.8
    lower_at: float = 0.2
    success_reward: float = 1.0

    def __post_init__(self):
        if self.n_levels < 1 or not 0 <= self.start < self.n_levels:
            raise ValueError(f"need n_levels >= 1 and 0 <= start < n_levels, got {self.n_levels}, {self.start}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if not 0.0 <= self.lower_at < self.raise_at <= 1.0:
            raise ValueError(f"need 0 <= lower_at < raise_at <= 1, got {self.lower_at}, {self.raise_at}")


class Curriculum:
    """The scheduler: ``update(rewards)`` after each batch of episodes, ``options()`` for the next resets."""

    def __init__(self, config: CurriculumConfig | None = None, **knobs):
        self.config = CurriculumConfig(**knobs) if config is None else config
        self.level = self.config.start
        self.outcomes: deque[bool] = deque()
        self.moves = 0  # level changes so far
        self.last_block_success = float("nan")  # success rate of the last full block

    @property
    def success_rate(self) -> float:
        """Success rate of the current, unfinished block (NaN when empty)."""
        return sum(self.outcomes) / len(self.outcomes) if self.outcomes else float("nan")

    def update(self, rewards: Iterable[float]) -> int:
        """Record episode rewards played at the current level, apply the rule after each one; returns the level."""
        c = self.config
        for reward in rewards:
            self.outcomes.append(float(reward) >= c.success_reward)
            if len(self.outcomes) < c.window:
                continue
            rate = self.success_rate
            self.last_block_success = rate
            step = 1 if rate >= c.raise_at and self.level < c.n_levels - 1 else \
                -1 if rate <= c.lower_at and self.level > 0 else 0
            self.level += step
            self.moves += step != 0
            self.outcomes.clear()
        return self.level

    def options(self) -> dict[str, int]:
        """``reset`` options for the current level."""
        return {"difficulty": self.level}

    def metrics(self) -> dict[str, float]:
        """What an RL run logs per step."""
        return {"curriculum/level": float(self.level), "curriculum/success": self.last_block_success,
                "curriculum/moves": float(self.moves)}

    def state_dict(self) -> dict:
        """Plain containers only (fits a ``weights_only`` checkpoint)."""
        return {"config": asdict(self.config), "level": self.level, "outcomes": list(self.outcomes),
                "moves": self.moves, "last_block_success": self.last_block_success}

    def load_state_dict(self, state: dict) -> None:
        if CurriculumConfig(**state["config"]) != self.config:
            raise ValueError(f"checkpoint curriculum config {state['config']} differs from {asdict(self.config)}")
        if not 0 <= state["level"] < self.config.n_levels:
            raise ValueError(f"level {state['level']} outside [0, {self.config.n_levels})")
        self.level, self.moves = int(state["level"]), int(state["moves"])
        self.last_block_success = float(state["last_block_success"])
        self.outcomes = deque(bool(o) for o in state["outcomes"])

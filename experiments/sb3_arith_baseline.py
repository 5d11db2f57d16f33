"""Stable-baselines3 PPO on an easy ArithRLVR setting through the numeric AnswerChoiceView.

The env is ``ArithRLVR-v0`` with 1-digit addition (``a+b``, answers 0..18); PPO sees the prompt's first
``obs_len`` chars (one-hot, by SB3) and picks one of the 19 answers (a contextual bandit, one step per episode).
Chance is 1/19 = 5.3%. Accuracy is measured with the deterministic policy on train-split and held-out test-split
problems (the split is a partition of the 100 problems, so test sums are never trained on).

    python experiments/sb3_arith_baseline.py --total-timesteps 30000
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

import envs  # noqa: E402, F401  (registers the ids)
from envs.wrappers import AnswerChoiceView  # noqa: E402


@dataclass(frozen=True)
class BaselineConfig:
    """PPO baseline settings (defaults run in about a minute on one CPU core)."""

    total_timesteps: int = 30_000
    """environment steps (= episodes) of PPO training"""
    max_digits: int = 1
    """operand digits of the addition problems"""
    obs_len: int = 16
    """prompt chars in the observation ("Compute 7+5. End" fits in 16)"""
    n_envs: int = 8
    n_steps: int = 128
    """rollout length per env; PPO batch = n_envs * n_steps"""
    batch_size: int = 256
    learning_rate: float = 1e-3
    ent_coef: float = 0.01
    eval_episodes: int = 500
    seed: int = 0
    out: str | None = None
    """optional path of a JSON file for the results"""


def make_view(cfg: BaselineConfig, split: str = "train") -> AnswerChoiceView:
    env = gym.make("ArithRLVR-v0", min_digits=1, max_digits=cfg.max_digits, ops="+", split=split)
    return AnswerChoiceView(env, obs_len=cfg.obs_len)


def accuracy(model, cfg: BaselineConfig, split: str, seed: int) -> float:
    """Mean reward of the deterministic policy over ``eval_episodes`` episodes of ``split``."""
    view = make_view(cfg, split)
    obs, _ = view.reset(seed=seed)
    total = 0.0
    for _ in range(cfg.eval_episodes):
        action, _ = model.predict(obs, deterministic=True)
        total += view.step(action)[1]
        obs, _ = view.reset()
    return total / cfg.eval_episodes


def run(cfg: BaselineConfig) -> dict:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    vec = make_vec_env(lambda: make_view(cfg), n_envs=cfg.n_envs, seed=cfg.seed)
    model = PPO("MlpPolicy", vec, n_steps=cfg.n_steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                ent_coef=cfg.ent_coef, gamma=1.0, gae_lambda=1.0, seed=cfg.seed, device="cpu", verbose=0)
    n_answers = int(make_view(cfg).action_space.n)
    before = {s: accuracy(model, cfg, s, seed=10_000 + cfg.seed) for s in ("train", "test")}
    t0 = time.perf_counter()
    model.learn(total_timesteps=cfg.total_timesteps)
    seconds = time.perf_counter() - t0
    after = {s: accuracy(model, cfg, s, seed=10_000 + cfg.seed) for s in ("train", "test")}
    return {"config": asdict(cfg), "chance": 1.0 / n_answers, "n_answers": n_answers,
            "before": before, "after": after, "train_seconds": seconds,
            "steps_per_second": cfg.total_timesteps / seconds}


def main() -> None:
    import tyro

    cfg = tyro.cli(BaselineConfig)
    result = run(cfg)
    print(f"chance (1/{result['n_answers']} answers): {result['chance']:.3f}")
    for split in ("train", "test"):
        print(f"{split:<6} accuracy  before {result['before'][split]:.3f}  after {result['after'][split]:.3f}")
    print(f"PPO {cfg.total_timesteps} steps in {result['train_seconds']:.1f} s "
          f"({result['steps_per_second']:.0f} steps/s)")
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

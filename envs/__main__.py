"""Env demo: ``python -m envs [n]`` prints, for every registered id, n prompts with their demonstration and the
rewards of the demonstration, of a wrong answer and of a hedged answer (several different markers)."""

from __future__ import annotations

import sys

import gymnasium as gym

import envs


def demo(n: int = 2) -> None:
    for env_id in envs.ENV_IDS:
        env = gym.make(env_id)
        kind = "exact verifier" if env.unwrapped.verifiable else "soft token-F1 score, NOT exactly verifiable"
        print(f"=== {env_id} ({kind})")
        for seed in range(n):
            prompt, info = env.reset(seed=seed)
            good = env.step(info["demonstration"])[1]
            env.reset(seed=seed)
            wrong = env.step("Answer: 12345")[1]
            env.reset(seed=seed)
            hedged = env.step(f"Answer: 12345\n{info['demonstration']}")[1]
            print(f"--- prompt:\n{prompt}--- demonstration:\n{info['demonstration']}")
            print(f"--- reward: demonstration {good:.2f}, wrong {wrong:.2f}, hedged {hedged:.2f}\n")


if __name__ == "__main__":
    demo(int(sys.argv[1]) if len(sys.argv) > 1 else 2)

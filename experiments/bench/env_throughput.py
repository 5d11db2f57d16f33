"""Episodes/s of reset+step (demonstration as the action) for every registered env, single process.

Rates are episodes per second of this process's CPU time (time.process_time), best of 5 repeats, so that other
jobs on a shared machine slow the wall clock but not the measurement; the ratios between columns are the robust
numbers. Columns, measured side by side in one run:
  made      gym.make(id) (PassiveEnvChecker + OrderEnforcing wrappers), one reset + one step per episode
  raw       env.unwrapped, same loop
  batch     envs.vector.TaskBatch(batch_size=256): one reset + one step per 256 episodes
  syncvec   gymnasium SyncVectorEnv with 16 copies (gym.make_vec, sync, SAME_STEP autoreset)
Goal: made >= 20k episodes/s for ArithRLVR-v0. A second table times the per-item seeding choice of envs.core.Uniforms.
A third covers the suite ids: ArithToolRLVR-v0 in turns/s (reset + tool call + final answer = 2 turns per episode,
gym.make'd and raw; goal >= 10k turns/s) and ReasoningGym-v0 episodes/s for a few library tasks (their generators
set the pace: the adapter adds one hash draw and a marker scan per episode).

    python experiments/bench/env_throughput.py [--seconds 0.3]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

import envs  # noqa: E402
from envs.core import Uniforms  # noqa: E402
from envs.vector import TaskBatch  # noqa: E402


def rate(run_chunk, episodes_per_chunk: int, seconds: float, repeats: int = 5) -> float:
    """Best-of-``repeats`` episodes per CPU-second, each repeat running whole chunks for ``seconds`` CPU."""
    best = 0.0
    for _ in range(repeats):
        n, t0 = 0, time.process_time()
        while (elapsed := time.process_time() - t0) < seconds:
            run_chunk()
            n += episodes_per_chunk
        best = max(best, n / elapsed)
    return best


def loop(env, k: int = 200):
    def run():
        for _ in range(k):
            _, info = env.reset()
            env.step(info["demonstration"])

    return run, k


def bench_env(env_id: str, seconds: float) -> dict[str, float]:
    made = gym.make(env_id)
    made.reset(seed=0)
    raw = gym.make(env_id).unwrapped
    raw.reset(seed=0)
    batch = TaskBatch(env_id, batch_size=256, seed=0)

    def run_batch():
        _, info = batch.reset()
        batch.step(info["demonstration"])

    # SAME_STEP autoreset: each step scores 16 episodes and returns the next 16 prompts and infos
    vec = gym.make_vec(env_id, num_envs=16, vectorization_mode="sync",
                       vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    _, vinfo = vec.reset(seed=0)
    state = {"info": vinfo}

    def run_vec():
        for _ in range(20):
            state["info"] = vec.step(tuple(state["info"]["demonstration"]))[4]

    out = {
        "made": rate(*loop(made), seconds),
        "raw": rate(*loop(raw), seconds),
        "batch": rate(run_batch, 256, seconds),
        "syncvec": rate(run_vec, 20 * 16, seconds),
    }
    vec.close()
    return out


def seeding_costs(seconds: float) -> dict[str, float]:
    """Microseconds per item for the two ways to derive an item's randomness from (base_seed, split, index)."""
    i = iter(range(10**9))

    def rng_way():
        for _ in range(200):
            np.random.default_rng([0, 0, next(i)]).random(24).tolist()

    def words_way():
        for _ in range(200):
            u = Uniforms(0, 0, next(i))
            [u.u() for _ in range(8)]

    return {"default_rng + random(24)": 1e6 / rate(rng_way, 200, seconds),
            "Uniforms (SeedSequence words)": 1e6 / rate(words_way, 200, seconds)}


def bench_tool_env(seconds: float) -> dict[str, float]:
    """Turns/s of ArithToolRLVR-v0 playing its demonstrations (one tool call, one answer per episode)."""
    out = {}
    for name, env in (("made", gym.make("ArithToolRLVR-v0")), ("raw", gym.make("ArithToolRLVR-v0").unwrapped)):
        env.reset(seed=0)

        def run(env=env, k=100):
            for _ in range(k):
                _, info = env.reset()
                for turn in info["demonstration_turns"]:
                    env.step(turn)

        out[name] = rate(run, 200, seconds)  # 100 episodes x 2 turns
    return out


RG_TASKS = ("chain_sum", "leg_counting", "word_sorting", "sudoku")


def bench_reasoning_gym(seconds: float) -> dict[str, float]:
    out = {}
    for task in RG_TASKS:
        env = gym.make("ReasoningGym-v0", task=task)
        env.reset(seed=0)
        out[task] = rate(*loop(env, 20), seconds, repeats=2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=0.3, help="minimum seconds per measurement repeat")
    args = parser.parse_args()
    print(f"{'env':<20}{'made/s':>10}{'raw/s':>10}{'batch/s':>10}{'syncvec/s':>11}"
          f"{'raw/made':>10}{'batch/made':>11}{'vec/made':>10}")
    for env_id in envs.ENV_IDS:
        r = bench_env(env_id, args.seconds)
        print(f"{env_id:<20}{r['made']:>10.0f}{r['raw']:>10.0f}{r['batch']:>10.0f}{r['syncvec']:>11.0f}"
              f"{r['raw'] / r['made']:>10.2f}{r['batch'] / r['made']:>11.2f}{r['syncvec'] / r['made']:>10.2f}")
    tool = bench_tool_env(args.seconds)
    print(f"\nArithToolRLVR-v0 turns/s: made {tool['made']:.0f}, raw {tool['raw']:.0f} (goal >= 10000)")
    for task, r in bench_reasoning_gym(args.seconds).items():
        print(f"ReasoningGym-v0 task={task:<14}{r:>10.0f} episodes/s (made)")
    costs = seeding_costs(args.seconds)
    base = costs["default_rng + random(24)"]
    for name, us in costs.items():
        print(f"item seeding {name:<32}{us:>7.1f} us/item  ({us / base:.2f}x)")


if __name__ == "__main__":
    main()

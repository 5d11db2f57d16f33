"""Probe overhead at the default cadence: the same run with probes on (ProbeConfig()) and off (every=0), side by side.

For each regime (SFT, LoRA SFT, RLVR from a 150-step SFT warm start) on the embedded model, one process runs the
identical config twice and prints
  wall_off, wall_on: run wall time (model load, eval, retention, checkpoints included), seconds
  overhead = (wall_on - wall_off) / wall_on          the fraction of the probed run spent on probes (goal <= 10%)
  probe_share = Σ probe/seconds / wall_on            the same, from the probes' own timers
  hvps/probe: mean HVPs per probe call
  every@10%: the λ_max cadence that would bring the overhead to 10 %, ⌈9·(probe s per call)/(s per step)⌉ with
             s per step = wall_off/steps (an upper bound, so this cadence is a lower bound)
The default 1000 optimizer steps give 6 λ_max solves and 2 batch-sharpness estimates at the default cadence; the
first, cold eigen-solve weighs more than in a longer run, so the printed overhead is an upper bound.

    python experiments/bench/probe_overhead.py [--steps 1000] [--regimes sft lora rl]
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere


@dataclass(frozen=True)
class Args:
    steps: int = 1000  # optimizer steps per run
    regimes: tuple[str, ...] = ("sft", "lora", "rl")
    model: str = "embedded"


def timed_run(cfg) -> tuple[float, list[dict]]:
    from agents.trainer import read_metrics
    from experiments.run import run

    t0 = time.perf_counter()
    run_dir = run(cfg, resume=False, progress=False)
    wall = time.perf_counter() - t0
    records = read_metrics(run_dir)
    status = json.loads((run_dir / "status.json").read_text())["status"]
    if status != "completed":
        raise RuntimeError(f"{run_dir.name} ended {status}")
    return wall, records


def main(args: Args) -> None:
    from dataclasses import replace

    import torch

    from agents.optim import OptimConfig
    from agents.trainer import TrainConfig
    from experiments.run import ModelConfig, RunConfig
    from probes import ProbeConfig

    torch.set_num_threads(1)
    if args.model == "embedded":
        from agents.embedded import embedded_model_path

        embedded_model_path()
    train = TrainConfig(steps=args.steps, checkpoint_every=0)
    bases = {
        "sft": RunConfig(regime="sft", model=ModelConfig(name=args.model), train=train),
        "lora": RunConfig(regime="sft", model=ModelConfig(name=args.model, lora_rank=8), train=train),
    }
    print(f"probe overhead at the default cadence ({ProbeConfig().every=}, {ProbeConfig().batch_sharpness_every=}),"
          f" {args.steps} steps, 1 thread")
    print(f"{'regime':<7}{'wall_off s':>11}{'wall_on s':>11}{'overhead':>10}{'probe_share':>13}{'probes':>8}"
          f"{'hvps/probe':>12}{'every@10%':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        if "rl" in args.regimes:  # RLVR from a short SFT warm start: the base model gets no reward variance
            from agents.trainer import FINAL_MODEL
            from experiments.run import EnvConfig, run

            env = EnvConfig(env_id="InstructRLVR-v0")
            warm = run(RunConfig(regime="sft", model=ModelConfig(name=args.model), env=env, name="warm", out_dir=tmp,
                                 optim=OptimConfig(lr=1e-2), train=TrainConfig(steps=150, checkpoint_every=0),
                                 probe=ProbeConfig(every=0)), progress=False)
            bases["rl"] = RunConfig(regime="rl", model=ModelConfig(name=str(warm / FINAL_MODEL)), env=env, train=train)
        for regime in args.regimes:
            base = bases[regime]
            off, _ = timed_run(replace(base, probe=ProbeConfig(every=0), out_dir=tmp, name=f"{regime}-off"))
            on, records = timed_run(replace(base, probe=ProbeConfig(), out_dir=tmp, name=f"{regime}-on"))
            probe_s = sum(r.get("probe/seconds", 0.0) for r in records)
            calls = [r for r in records if "probe/seconds" in r]
            hvps = sum(r.get("probe/hvps", 0.0) for r in calls) / max(1, len(calls))
            every10 = math.ceil(9 * (probe_s / max(1, len(calls))) / (off / args.steps))
            print(f"{regime:<7}{off:>11.1f}{on:>11.1f}{(on - off) / on:>10.1%}{probe_s / on:>13.1%}{len(calls):>8}"
                  f"{hvps:>12.1f}{every10:>11d}", flush=True)


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))

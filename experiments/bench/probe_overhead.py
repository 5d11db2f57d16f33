"""Probe overhead at the default cadence: the same run with probes on (ProbeConfig()) and off (every=0), interleaved.

For each regime (SFT, LoRA SFT, RLVR from a 150-step SFT warm start) on the embedded model, one process runs the
identical config in ``--blocks`` blocks of off, on, on, off (A B B A, so a drift of the shared machine's speed
cancels within a block), and prints one row per run
  wall: run wall time (model load, eval, retention, checkpoints included), seconds
  probe_s: Σ probe/seconds, the probes' own timers; calls: the probe calls, counted from the run's metrics (rows
           with probe/seconds), and of those the calls that solved λ_max, estimated batch sharpness, critical
           sharpness and the Rayleigh quotient (rows with probe/lambda_max, probe/batch_sharpness,
           probe/critical_sharpness, probe/rayleigh); hvps/call: mean HVPs per probe call
then, per regime, the median [min–max] over the repeats of
  overhead = (wall_on - wall_off) / wall_on   for each adjacent off/on pair of a block (2 pairs per block)
  probe_share = probe_s / wall_on             for each probed run: the fraction of it spent in probes (goal ≤ 10%)
  every@10%: the λ_max cadence that would bring the overhead to 10 %, ⌈9·(probe s per call)/(s per step)⌉ with
             s per step = the median wall_off/steps (an upper bound, so this cadence is a lower bound)
Which probes run, and how often, follows from ProbeConfig()'s cadences and ``--steps``; the rows print the counts
(no count is assumed here). The first, cold eigen-solve weighs more than in a longer run, so a short run's
overhead is an upper bound. Times are wall clock: on a shared machine, read the spread.

    python experiments/bench/probe_overhead.py [--steps 1000] [--regimes sft lora rl] [--blocks 2] [--defaults cli]
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from experiments.bench.spread import spread  # noqa: E402


@dataclass(frozen=True)
class Args:
    steps: int = 1000  # optimizer steps per run
    regimes: tuple[str, ...] = ("sft", "lora", "rl")
    model: str = "embedded"
    blocks: int = 2  # off-on-on-off blocks per regime (4 runs each)
    # cli: each regime at what `eoslab sft/lora/rl` run (experiments.run.default_config: SFT AdamW 1e-3, batch 64);
    # user: RunConfig's own defaults, the user's setup (SGD momentum 0.9, weight decay 1e-4, batch 16)
    defaults: str = "user"


KINDS = {"λ_max": "probe/lambda_max", "batch sharpness": "probe/batch_sharpness",
         "critical": "probe/critical_sharpness", "rayleigh": "probe/rayleigh"}


def probe_counts(records: list[dict]) -> dict[str, float]:
    """From a run's metrics rows: calls (rows with probe/seconds), their seconds and HVPs, and the calls of each
    kind in KINDS."""
    calls = [r for r in records if "probe/seconds" in r]
    out = {"calls": len(calls), "seconds": sum(r["probe/seconds"] for r in calls),
           "hvps": sum(r.get("probe/hvps", 0.0) for r in calls)}
    out.update({kind: sum(key in r for r in calls) for kind, key in KINDS.items()})
    kinds = {k[len("probe/"):-len("_seconds")] for r in calls for k in r
             if k.endswith("_seconds") and k != "probe/seconds"}
    out["kind_seconds"] = {k: sum(r.get(f"probe/{k}_seconds", 0.0) for r in calls) for k in sorted(kinds)}
    return out


def summarize(runs: list[tuple[str, float, dict]], steps: int) -> dict[str, object]:
    """``runs``: (kind "off"/"on", wall seconds, probe_counts or {}) in run order, in A B B A blocks. Overheads pair
    each on with the off beside it in its block (off on | on off); probe shares are per probed run."""
    overheads = []
    for i in range(0, len(runs) - 1, 2):
        (k1, w1, _), (k2, w2, _) = runs[i], runs[i + 1]
        on, off = (w1, w2) if k1 == "on" else (w2, w1)
        if {k1, k2} != {"on", "off"}:
            raise ValueError(f"runs {i}, {i + 1} are not an off/on pair: {k1}, {k2}")
        overheads.append((on - off) / on)
    probed = [(w, c) for k, w, c in runs if k == "on"]
    offs = [w for k, w, _ in runs if k == "off"]
    per_call = [c["seconds"] / max(1, c["calls"]) for _, c in probed]
    every10 = math.ceil(9 * statistics.median(per_call) / (statistics.median(offs) / steps)) if probed else 0
    return {"overhead": spread(overheads), "probe_share": spread([c["seconds"] / w for w, c in probed]),
            "every10": every10}


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
    from experiments.run import default_config
    from experiments.run import replace as replace_sections

    if args.defaults not in ("cli", "user"):
        raise SystemExit(f"--defaults must be cli or user, got {args.defaults!r}")
    train = TrainConfig(steps=args.steps, checkpoint_every=0)
    if args.defaults == "cli":
        bases = {r: replace_sections(default_config(r), model={"name": args.model},
                                     train={"steps": args.steps, "checkpoint_every": 0}) for r in ("sft", "lora")}
    else:
        bases = {"sft": RunConfig(regime="sft", model=ModelConfig(name=args.model), train=train),
                 "lora": RunConfig(regime="sft", model=ModelConfig(name=args.model, lora_rank=8), train=train)}
    print(f"probe overhead at the default cadence ({ProbeConfig().every=}, {ProbeConfig().batch_sharpness_every=},"
          f" {ProbeConfig().critical_every=}, {ProbeConfig().rayleigh_every=}), {args.steps} steps, 1 thread, "
          f"{args.blocks} blocks of off-on-on-off per regime, {args.defaults} defaults")
    print(f"{'regime':<7}{'block':>6}{'probes':>7}{'wall s':>9}{'probe_s':>9}{'calls':>7}  "
          + " ".join(f"{k:>{max(8, len(k))}}" for k in KINDS) + f"{'hvps/call':>11}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "rl" in args.regimes:  # RLVR from a short SFT warm start: the base model gets no reward variance
            from agents.trainer import FINAL_MODEL
            from experiments.run import EnvConfig, run

            env = EnvConfig(env_id="InstructRLVR-v0")
            warm = run(RunConfig(regime="sft", model=ModelConfig(name=args.model), env=env, name="warm", out_dir=tmp,
                                 optim=OptimConfig(lr=1e-2), train=TrainConfig(steps=150, checkpoint_every=0),
                                 probe=ProbeConfig(every=0)), progress=False)
            bases["rl"] = RunConfig(regime="rl", model=ModelConfig(name=str(warm / FINAL_MODEL)), env=env, train=train)
            if args.defaults == "cli":
                bases["rl"] = replace_sections(default_config("rl"), model={"name": str(warm / FINAL_MODEL)},
                                               train={"steps": args.steps, "checkpoint_every": 0})
        summaries = {}
        for regime in args.regimes:
            base = bases[regime]
            runs = []
            for block in range(args.blocks):
                for i, kind in enumerate(("off", "on", "on", "off")):
                    probe = ProbeConfig() if kind == "on" else ProbeConfig(every=0)
                    wall, records = timed_run(replace(base, probe=probe, out_dir=tmp,
                                                      name=f"{regime}-{block}-{i}-{kind}"))
                    c = probe_counts(records) if kind == "on" else {}
                    runs.append((kind, wall, c))
                    cells = (f"{c['seconds']:>9.1f}{c['calls']:>7d}  "
                             + " ".join(f"{c[k]:>{max(8, len(k))}d}" for k in KINDS)
                             + f"{c['hvps'] / max(1, c['calls']):>11.1f}") if c else ""
                    print(f"{regime:<7}{block:>6d}{kind:>7}{wall:>9.1f}{cells}", flush=True)
                    if c:
                        print("        seconds per kind: " + ", ".join(f"{k} {s:.1f}" for k, s in
                                                                      c["kind_seconds"].items() if s >= 0.05))
            summaries[regime] = summarize(runs, args.steps)
        print(f"\nmedian [min–max] over the repeats ({args.blocks} blocks: {2 * args.blocks} off/on pairs, "
              f"{2 * args.blocks} probed runs):")
        print(f"{'regime':<7}  {'overhead (on - off) / on':<36}{'probe_share':<36}{'every@10%':>9}")
        for regime, sm in summaries.items():
            print(f"{regime:<7}  {sm['overhead'].fmt('.1%'):<36}{sm['probe_share'].fmt('.1%'):<36}"
                  f"{sm['every10']:>9d}")


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))

"""Does post-training learn on the embedded default? Held-out accuracy before -> after each regime, per env.

For every env, one run of each regime at the defaults of the CLI (``experiments.run.default_config``):

* ``sft``      `eoslab sft` (full fine-tuning);
* ``lora``     `eoslab lora` (rank 8 adapters);
* ``sgd``      the user's setting (SGD, momentum 0.9, weight decay 1e-4, batch 16) at each ``--sgd-lrs``, with
  ``--sgd-steps`` steps (chosen so its training time matches the SFT default's);
* ``rl``       `eoslab rl` from a brief SFT warm start (``--warm-steps`` SFT steps: a policy well below the ceiling);
  RL trains on the env's "rl" pool of train problems, disjoint from SFT's;
* ``rl-base``  `eoslab rl` from the bare base model (does the base ever earn a reward?).

Printed per run: greedy accuracy on the held-out test problems at step 0 and at the end (n = ``n_eval``, with a
95 % Wilson interval), retention perplexity before -> after (and the ratio), RL's mean reward (first and last 10 %
of steps) and KL to the reference, and seconds: wall (the whole run: start-up, training, evals, probes at the
defaults, checkpoints; one torch thread; the time of the run that produced the directory, so rerunning reprints
without re-measuring — delete ``--out`` to measure again), then training alone (the sum of ``time/step_s``: what the
15-minute budget counts) and probes (``probe/seconds``). The numbers in the README come from this script.

    python experiments/bench/learnability.py                                  # every env (hours on a 2-core CPU)
    python experiments/bench/learnability.py --envs ArithRLVR-v0 --sgd-lrs 0.03 0.1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

ENVS = ("ArithRLVR-v0", "ArithRLVR-hard-v0", "InstructRLVR-v0")
REGIMES = ("sft", "lora", "sgd", "rl", "rl-base")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return float("nan"), float("nan")
    p, d = k / n, 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)  # clamp the rounding at k = 0 or n


def timed_run(cfg) -> tuple[Path, float]:
    """Run ``cfg`` (or find it done); returns (run dir, wall seconds of the run that produced it)."""
    from experiments.run import run, run_name

    run_dir = Path(cfg.out_dir) / run_name(cfg)
    stamp = run_dir / "bench_seconds.json"
    if (run_dir / "DONE").exists() and stamp.exists():
        return run_dir, json.loads(stamp.read_text())["seconds"]
    t0 = time.perf_counter()
    run(cfg, progress=False)
    seconds = time.perf_counter() - t0
    stamp.write_text(json.dumps({"seconds": seconds}))
    return run_dir, seconds


def summarize(run_dir: Path, seconds: float) -> dict:
    from agents.trainer import read_metrics

    rows = read_metrics(run_dir)
    config = json.loads((run_dir / "config.json").read_text())["config"]
    n = config["env"]["n_eval"]
    acc = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
    ppl = [r["retention/perplexity"] for r in rows if r.get("retention/perplexity") is not None]
    out = {"run": run_dir.name, "seconds": seconds, "n_eval": n, "status": json.loads(
        (run_dir / "status.json").read_text())["status"]}
    if acc:
        out["acc0"], out["acc1"] = acc[0][1], acc[-1][1]
        out["acc1_ci"] = wilson(round(acc[-1][1] * n), n)
    if ppl:
        out["ppl0"], out["ppl1"] = ppl[0], ppl[-1]
    out["train_seconds"] = sum(r.get("time/step_s", 0.0) for r in rows)
    out["probe_seconds"] = sum(r.get("probe/seconds", 0.0) for r in rows)
    rewards = [r["env/reward_mean"] for r in rows if r.get("env/reward_mean") is not None]
    if rewards:
        k = max(1, len(rewards) // 10)
        out["reward0"], out["reward1"] = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
        kls = [r["rl/kl"] for r in rows if r.get("rl/kl") is not None]
        out["kl1"] = kls[-1] if kls else None
    return out


def plan(env_id: str, args) -> list[tuple[str, object]]:
    """(label, RunConfig) in execution order; the RL warm start comes before RL."""
    from agents.trainer import FINAL_MODEL
    from experiments.run import default_config, replace, warm_start_config

    def cfg(command: str, **sections):
        base = default_config(command)
        c = replace(base, out_dir=str(args.out / env_id), env={"env_id": env_id, "n_eval": args.n_eval},
                    model={"name": args.model} if command != "rl" else {})
        if c.replay.weight > 0:
            c = replace(c, replay={"source": args.replay_source})
        return replace(c, **sections) if sections else c

    def steps(c, n):
        return replace(c, train={"steps": n}) if n else c

    warm = replace(warm_start_config(args.warm_steps), out_dir=str(args.out / env_id),
                   env={"env_id": env_id, "n_eval": args.n_eval}, model={"name": args.model})
    warm_dir = Path(warm.out_dir) / warm.name / FINAL_MODEL
    runs = {"sft": [("sft", steps(cfg("sft"), args.sft_steps))], "lora": [("lora", steps(cfg("lora"), args.lora_steps))],
            "sgd": [], "rl": [("warm start", warm), ("rl", steps(cfg("rl", model={"name": str(warm_dir)},
                                                                   name="rl-from-warm-start"), args.rl_steps))],
            "rl-base": [("rl-base", steps(cfg("rl", model={"name": args.model}, name="rl-from-base"),
                                          args.rl_base_steps))]}
    for lr in args.sgd_lrs:
        sgd = cfg("sft", optim={"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "constant",
                                "warmup_steps": 0},
                  train={"micro_batch": 16, "grad_accum": 1, "steps": args.sgd_steps})
        runs["sgd"].append((f"sgd lr={lr:g}", sgd))
    return [r for regime in args.regimes for r in runs[regime]]


def fmt(row: dict) -> str:
    def f(key, spec=".3f"):
        return format(row[key], spec) if row.get(key) is not None else "-"

    ci = row.get("acc1_ci")
    cell = f"{f('acc0')} -> {f('acc1')}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
    ppl = f"{f('ppl0', '.1f')} -> {f('ppl1', '.1f')} (x{row['ppl1'] / row['ppl0']:.2f})" if "ppl0" in row else "-"
    rl = f"reward {f('reward0')} -> {f('reward1')}, kl {f('kl1', '.4f')}" if "reward0" in row else ""
    secs = f"{row['seconds']:5.0f} ({row['train_seconds']:.0f} + {row['probe_seconds']:.0f})s"
    return f"{cell:<34} {ppl:<28} {secs:<20} {row['status']:<9} {rl}"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", nargs="+", default=list(ENVS))
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    p.add_argument("--model", default="embedded", help="'embedded' or a local model directory")
    p.add_argument("--replay-source", default="auto",
                   help="pre-training text replayed by SFT/LoRA ('auto': the embedded model's; for another model a "
                        "JSON list of texts or a text file)")
    p.add_argument("--n-eval", type=int, default=500, help="held-out test problems scored at start and end")
    p.add_argument("--out", type=Path, default=Path("runs/bench/learnability"))
    p.add_argument("--sft-steps", type=int, default=0, help="0 = the default of `eoslab sft`")
    p.add_argument("--lora-steps", type=int, default=0, help="0 = the default of `eoslab lora`")
    p.add_argument("--sgd-lrs", type=float, nargs="*", default=[0.01, 0.03, 0.1, 0.3],
                   help="the user's SGD setting at each of these LRs (the grid that finds its best LR)")
    p.add_argument("--sgd-steps", type=int, default=3000,
                   help="SGD steps: 3000 at batch 16 train for about as long as the SFT default's 1000 at batch 64")
    p.add_argument("--warm-steps", type=int, default=150)
    p.add_argument("--rl-steps", type=int, default=0, help="0 = the default of `eoslab rl`")
    p.add_argument("--rl-base-steps", type=int, default=50)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = []
    for env_id in args.envs:
        print(f"\n== {env_id}   held-out accuracy (95% CI)           retention ppl                "
              "wall (train + probes)", flush=True)
        for label, cfg in plan(env_id, args):
            row = {"env": env_id, "label": label, **summarize(*timed_run(cfg))}
            results.append(row)
            print(f"  {label:<12} {fmt(row)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

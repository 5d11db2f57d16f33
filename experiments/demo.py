"""``eoslab demo`` (``make demo``): the whole study, small, on CPU (1785 s on the 2-core machine while 4-8 other jobs
shared it; not yet timed on an idle one).

1. builds (first time, ~4-5 min) or loads the embedded GPT-NeoX model (agents.embedded);
2. runs three small learning-rate studies with probes on both cores, on arithmetic with column working
   (ArithRLVR-v0): full SFT, LoRA SFT (rank 8) and RLVR (PPO, group baseline; from a 150-step warm start of
   `eoslab sft` at its defaults, a policy that has learnt part of the task, so rewards vary within groups), each
   with RunConfig's default optimizer (SGD, momentum 0.9, weight decay 1e-4) and effective batch 16 = 4×4 (RL: 4
   prompts × 4 samples); and, to show the policy learning, one RLVR run at ``eoslab rl``'s defaults (100 steps,
   no probes) beside the warm start's SFT curve. The learning rates reach above the usual 1e-4…1e-2, because on
   the 1.4M-parameter model only η ≳ 0.1 brings η·λ_max near the momentum edge 2+2β = 3.8 within 80 steps
   (measured: η·λ ≈ 0.4 at η = 0.01, ≈ 4 at η = 0.1);
3. runs the Cohen et al. 2021 validation (full-batch GD on a tanh MLP, experiments.cohen2021) on the second core
   while the model builds;
4. writes the report (HTML + PNGs, EoS phase table, forgetting, base vs fine-tuned samples) and prints its path.

Re-running skips finished runs (DONE), so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from agents.embedded import embedded_model_path
from agents.optim import OptimConfig
from agents.ppo import PPOConfig
from agents.trainer import TrainConfig
from experiments.cohen2021 import CohenConfig, config_errors, run_cohen
from experiments.report import ReportConfig, phase_rows, write_report
from experiments.run import (ConfigError, EnvConfig, ModelConfig, RunConfig, default_config, replace,
                             run_name, warm_start_config)
from experiments.rundirs import find_runs
from experiments.sweep import WARM_START, Sweep, execute, grid, plan
from probes import ProbeConfig


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")  # sweeps go to OUT/<study>/, the report to OUT/report/
    workers: int = 2  # parallel runs (one core each)
    model: str = "embedded"  # the offline default; or a local model directory
    sft_lrs: tuple[float, ...] = (1e-2, 3e-2, 1e-1)  # SFT study: one run per learning rate
    sft_steps: int = 80  # optimizer steps per SFT run
    lora_rank: int = 8  # LoRA study: adapter rank
    lora_lrs: tuple[float, ...] = (3e-2, 1e-1, 3e-1)  # LoRA study: one run per learning rate
    lora_steps: int = 80  # optimizer steps per LoRA run
    rl_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)  # RLVR study (PPO from the SFT warm start): one run per LR
    rl_steps: int = 50  # optimizer steps per RLVR run
    warm_start_steps: int = 150  # SFT steps (no probes) before RLVR, so that rewards vary within groups
    rl_learn_steps: int = 100  # one RLVR run at `eoslab rl`'s defaults from the warm start, to show learning (0 = off)
    n_eval: int = 100  # held-out problems scored at each eval (accuracy ± ~0.09 at 95%)
    probe_every: int = 10  # λ_max cadence (optimizer steps)
    batch_sharpness_every: int = 25  # batch sharpness cadence (0 = off)
    cohen_lrs: tuple[float, ...] = (0.3, 0.45, 0.6)  # Cohen et al. 2021 validation: one GD run per η
    cohen_steps: int = 500  # GD steps per Cohen run


def demo_sweeps(cfg: DemoConfig):
    """The three LM studies as Sweeps."""
    # tol 1e-2 (residual; λ error ~ tol²·gap⁻¹) saves HVPs against the default 1e-3: probes are most of the demo's time
    # probe_set_size=0: λ_max of the current 16-example batch, as before the fixed probe set existed; a fixed
    # 64-example set plus the batch's own solve would multiply the probe time the demo's budget is built on
    probe = ProbeConfig(every=cfg.probe_every, tol=1e-2, batch_sharpness_every=cfg.batch_sharpness_every,
                        batch_min_samples=4, batch_max_samples=8, probe_set_size=0)
    sft = RunConfig(
        regime="sft",
        model=ModelConfig(name=cfg.model),
        env=EnvConfig(env_id="ArithRLVR-v0", n_eval=cfg.n_eval),
        optim=OptimConfig(name="sgd", momentum=0.9, weight_decay=1e-4),
        train=TrainConfig(steps=cfg.sft_steps, micro_batch=4, grad_accum=4, eval_every=50, retention_every=50,
                          retention_tokens=4096, checkpoint_every=0, n_samples=4),
        probe=probe,
    )
    lora = replace(sft, model={"lora_rank": cfg.lora_rank}, train={"steps": cfg.lora_steps})
    warm = replace(warm_start_config(cfg.warm_start_steps), model={"name": cfg.model}, env=sft.env,
                   train={"eval_every": 50, "retention_every": 50, "retention_tokens": 4096, "checkpoint_every": 0,
                          "n_samples": 4})
    rl = replace(sft, regime="rl", model={"name": WARM_START}, ppo=PPOConfig(prompts_per_step=4, group_size=4,
                                                                             max_new_tokens=48, temperature=0.7),
                 train={"steps": cfg.rl_steps, "micro_batch": 8, "grad_accum": 1, "eval_every": 20,
                        "retention_every": 20, "save_model": False})
    # The EoS grids above are too short to learn much; this run shows the policy learning: `eoslab rl` at its
    # defaults (AdamW 1e-4, 32 prompts x 8 samples) gained +0.05 held-out by step 50 and +0.13 by step 100 from this
    # warm start (learnability.py, one seed). Probes off: its budget goes to rollouts.
    learn = replace(default_config("rl"), model={"name": WARM_START}, env=sft.env, probe=ProbeConfig(every=0),
                    train={"steps": cfg.rl_learn_steps, "eval_every": 25, "retention_every": 50,
                           "retention_tokens": 4096, "checkpoint_every": 0, "n_samples": 4, "save_model": False})
    rl_runs = ((learn,) if cfg.rl_learn_steps > 0 else ()) + tuple(grid(rl, lrs=cfg.rl_lrs))
    return [
        Sweep("rl", rl_runs, "RLVR (PPO, group baseline) from an SFT warm start: an EoS grid (SGD) and one run at "
                             "`eoslab rl`'s defaults (AdamW)", warm_start=warm),
        Sweep("sft", grid(sft, lrs=cfg.sft_lrs), "full-parameter SFT"),
        Sweep(f"lora_r{cfg.lora_rank}", grid(lora, lrs=cfg.lora_lrs), f"LoRA rank {cfg.lora_rank} SFT"),
    ]


def _cohen_runs(lrs: tuple[float, ...], steps: int, out_dir: str) -> list[Path]:
    torch.set_num_threads(1)
    return [run_cohen(CohenConfig(lr=lr, steps=steps, out_dir=out_dir)) for lr in lrs]


def run_demo(cfg: DemoConfig = DemoConfig()) -> Path:
    """Run the demo; returns the report's index.html."""
    errors = [f"demo.workers={cfg.workers} must be >= 1"] if cfg.workers < 1 else []
    errors += [f"demo.{k}={getattr(cfg, k)} must be >= 0" for k in ("rl_learn_steps", "n_eval")
               if getattr(cfg, k) < 0]
    errors += [f"demo.{k}_lrs is empty" for k in ("sft", "lora", "rl") if not getattr(cfg, f"{k}_lrs")]
    errors += [f"demo cohen: {e}" for lr in cfg.cohen_lrs
               for e in config_errors(CohenConfig(lr=lr, steps=cfg.cohen_steps))]
    if errors:
        raise ConfigError("invalid demo config:\n  - " + "\n  - ".join(errors))
    t0 = time.perf_counter()
    stamp = lambda: f"[{time.perf_counter() - t0:5.0f}s]"  # noqa: E731
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every spawned process: one core each
    sweeps = demo_sweeps(cfg)
    planned = [p for s in sweeps for p in plan(s, cfg.out)]  # validates every config before any work
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as side:
        # the Cohen validation needs no language model: it runs on the second core while the model builds
        print(f"{stamp()} Cohen et al. 2021 validation (full-batch GD, tanh MLP, digits) in the background",
              flush=True)
        cohen = side.submit(_cohen_runs, tuple(cfg.cohen_lrs), cfg.cohen_steps, str(cfg.out / "cohen2021"))
        if cfg.model == "embedded":
            print(f"{stamp()} embedded model (built and cached on first use, ~4-5 min)", flush=True)
            path = embedded_model_path()
            print(f"{stamp()} model: {path}", flush=True)
        print(f"{stamp()} {len(planned)} LM runs on {cfg.workers} workers -> {cfg.out}", flush=True)
        results = execute(planned, workers=cfg.workers, echo=lambda s: print(f"{stamp()} {s}", flush=True))
        cohen.result()
    dirs = [cfg.out / s.name for s in sweeps] + [cfg.out / "cohen2021"]
    index = write_report(dirs, ReportConfig(out=cfg.out / "report",
                                            title="eoslab demo: Edge of Stability in post-training"))
    print(f"{stamp()} EoS phases (r = λ/θ, 1 at the edge):")
    runs = find_runs(dirs)
    for row in phase_rows(runs):
        if "phase" in row:
            print(f"  {row['run']:<44} {row['regime']:<8} lr={row['lr']:<7g} {row['phase']:<11} "
                  f"onset={row.get('onset_step')} max r={row['max_ratio']:.2f} [{row['status']}]")
    print(f"{stamp()} learning (held-out greedy accuracy, first -> last eval):")
    rl = next(s for s in sweeps if s.name == "rl")
    learners = {run_name(rl.warm_start)} | ({run_name(rl.configs[0])} if cfg.rl_learn_steps > 0 else set())
    for run in runs:
        steps, acc = run.series("eval/accuracy")
        if run.name in learners and len(acc):  # the warm start and the default RLVR run
            print(f"  {run.name:<44} {run.regime:<4} {run.optimizer} lr={run.lr:<7g} "
                  f"{acc[0]:.3f} -> {acc[-1]:.3f} by step {steps[-1]:g}")
    for r in results:
        if r.status == "error":
            print(f"  FAILED {r.run_dir.name}: {r.error}")
    print(f"{stamp()} report: {index.resolve()}", flush=True)
    return index

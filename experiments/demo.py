"""``eoslab demo`` (``make demo``): the whole study, small, on CPU, in under 15 minutes on a fresh 2-core machine.

1. builds (first time, ~3-4 min) or loads the embedded GPT-NeoX model (agents.embedded);
2. runs three small learning-rate studies with probes on both cores, on verifiable instruction tasks
   (InstructRLVR-v0): full SFT, LoRA SFT (rank 8) and RLVR (PPO, group baseline; from a 150-step SFT warm start,
   since the base model never emits the answer format and would get zero reward variance), each with the seed's
   optimizer (SGD, momentum 0.9, weight decay 1e-4) and effective batch 16 = 4×4 (RL: 4 prompts × 4 samples).
   The learning rates are larger than the seed's 1e-4…1e-2 so that 100 steps reach the edge on the small model;
3. runs the Cohen et al. 2021 validation (full-batch GD on a tanh MLP, experiments.cohen2021);
4. writes the report (HTML + PNGs, EoS phase table, forgetting, base vs fine-tuned samples) and prints its path.

Re-running skips finished runs (DONE), so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")  # sweeps go to OUT/<study>/, the report to OUT/report/
    workers: int = 2  # parallel runs (one core each)
    model: str = "embedded"  # the offline default; or a local model directory
    sft_lrs: tuple[float, ...] = (1e-2, 3e-2, 1e-1)
    sft_steps: int = 100
    lora_rank: int = 8
    lora_lrs: tuple[float, ...] = (3e-2, 1e-1, 3e-1)
    lora_steps: int = 100
    rl_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    rl_steps: int = 60
    warm_start_steps: int = 150  # SFT steps (no probes) before RLVR, so that rewards vary within groups
    probe_every: int = 10  # λ_max cadence (optimizer steps)
    batch_sharpness_every: int = 30  # batch sharpness cadence (0 = off)
    cohen_lrs: tuple[float, ...] = (0.3, 0.45, 0.6)
    cohen_steps: int = 500


def demo_sweeps(cfg: DemoConfig):
    """The three LM studies as Sweeps (importing training code only here)."""
    from agents.optim import OptimConfig
    from agents.ppo import PPOConfig
    from agents.trainer import TrainConfig
    from experiments.run import EnvConfig, ModelConfig, RunConfig, replace
    from experiments.sweep import WARM_START, Sweep, grid
    from probes import ProbeConfig

    probe = ProbeConfig(every=cfg.probe_every, batch_sharpness_every=cfg.batch_sharpness_every, batch_min_samples=4,
                        batch_max_samples=8)
    sft = RunConfig(
        regime="sft",
        model=ModelConfig(name=cfg.model),
        env=EnvConfig(env_id="InstructRLVR-v0", n_train=512, n_eval=32),
        optim=OptimConfig(name="sgd", momentum=0.9, weight_decay=1e-4),
        train=TrainConfig(steps=cfg.sft_steps, micro_batch=4, grad_accum=4, eval_every=50, retention_every=50,
                          retention_tokens=4096, checkpoint_every=0, n_samples=4, eval_max_new_tokens=16),
        probe=probe,
    )
    lora = replace(sft, model={"lora_rank": cfg.lora_rank}, train={"steps": cfg.lora_steps})
    warm = replace(sft, name="warm-start-sft", optim={"lr": 1e-2}, probe=ProbeConfig(every=0),
                   train={"steps": cfg.warm_start_steps})
    rl = replace(sft, regime="rl", model={"name": WARM_START}, ppo=PPOConfig(prompts_per_step=4, group_size=4,
                                                                             max_new_tokens=16),
                 train={"steps": cfg.rl_steps, "micro_batch": 8, "grad_accum": 1, "eval_every": 20,
                        "retention_every": 20, "save_model": False})
    return [
        Sweep("rl", grid(rl, lrs=cfg.rl_lrs), "RLVR (PPO, group baseline) from an SFT warm start", warm_start=warm),
        Sweep("sft", grid(sft, lrs=cfg.sft_lrs), "full-parameter SFT"),
        Sweep(f"lora_r{cfg.lora_rank}", grid(lora, lrs=cfg.lora_lrs), f"LoRA rank {cfg.lora_rank} SFT"),
    ]


def run_demo(cfg: DemoConfig = DemoConfig()) -> Path:
    """Run the demo; returns the report's index.html."""
    from experiments.cohen2021 import CohenConfig, run_cohen
    from experiments.report import ReportConfig, phase_rows, write_report
    from experiments.rundirs import find_runs
    from experiments.sweep import execute, plan

    t0 = time.perf_counter()
    stamp = lambda: f"[{time.perf_counter() - t0:5.0f}s]"  # noqa: E731
    if cfg.model == "embedded":
        from agents.embedded import embedded_model_path

        print(f"{stamp()} embedded model (built and cached on first use, ~3-4 min)", flush=True)
        print(f"{stamp()} model: {embedded_model_path()}", flush=True)
    sweeps = demo_sweeps(cfg)
    planned = [p for s in sweeps for p in plan(s, cfg.out)]  # RL first: the longest runs start first
    print(f"{stamp()} {len(planned)} LM runs on {cfg.workers} workers -> {cfg.out}", flush=True)
    results = execute(planned, workers=cfg.workers, echo=lambda s: print(f"{stamp()} {s}", flush=True))
    print(f"{stamp()} Cohen et al. 2021 validation (full-batch GD, tanh MLP, digits)", flush=True)
    for lr in cfg.cohen_lrs:
        run_cohen(CohenConfig(lr=lr, steps=cfg.cohen_steps, out_dir=str(cfg.out / "cohen2021")))
    index = write_report([cfg.out / s.name for s in sweeps] + [cfg.out / "cohen2021"],
                         ReportConfig(out=cfg.out / "report", title="eoslab demo: Edge of Stability in post-training"))
    print(f"{stamp()} EoS phases (λ/θ: r=1 is the edge):")
    for row in phase_rows(find_runs([cfg.out / s.name for s in sweeps] + [cfg.out / "cohen2021"])):
        print(f"  {row['run']:<48} {row['regime']:<8} lr={row['lr']:<7g} {row.get('phase', '-'):<11} "
              f"onset={row.get('onset_step')} max r={row.get('max_ratio', float('nan')):.2f} [{row['status']}]")
    failed = [r for r in results if r.status == "error"]
    for r in failed:
        print(f"  FAILED {r.run_dir.name}: {r.error}")
    print(f"{stamp()} report: {index.resolve()}", flush=True)
    return index

"""``eoslab demo`` (``make demo``): ``eoslab study --scale demo`` beside the Cohen et al. 2021 validation, on CPU.

1. runs the Cohen et al. 2021 validation (full-batch GD on a tanh MLP, experiments.cohen2021) on a side core while
   the embedded GPT-NeoX model is built (first time, ~4-5 min) or loaded (agents.embedded);
2. runs the study at its demo scale (experiments.study): RLVR's warm start (150 SFT steps, held-out accuracy every
   50 steps: the learning curve), the λ₀ calibrations, then SFT and LoRA r16 under full-batch GD and the user's
   SGD (momentum 0.9, wd 1e-4, batch 16) and RLVR under the user's SGD, at two learning rates placed from the
   measured λ₀ (r₀ = η·λ₀/c ∈ {0.5, 2}), with λ_max probed every few steps;
3. writes the findings page over the study and the Cohen runs (report/index.html, findings.md) and prints the EoS
   phase of every run and the held-out accuracy of every run that measured it more than once.

Re-running skips finished runs (DONE), so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

from experiments.cohen2021 import CohenConfig, config_errors, run_cohen
from experiments.report import phase_rows
from experiments.rundirs import find_runs
from experiments.run import ConfigError
from experiments.study import StudyConfig, check, resolve, run_study
from experiments.study import config_errors as study_config_errors


@dataclass(frozen=True)
class DemoConfig:
    #: the study the demo runs (``--study.workers``, ``--study.model``, ...); its report holds the Cohen runs too
    study: StudyConfig = field(default_factory=lambda: StudyConfig(scale="demo", out=Path("runs/demo")))
    cohen_lrs: tuple[float, ...] = (0.3, 0.45, 0.6)  # Cohen et al. 2021 validation: one GD run per η
    cohen_steps: int = 500  # GD steps per Cohen run


def _cohen_runs(lrs: tuple[float, ...], steps: int, out_dir: str) -> list[Path]:
    import torch

    torch.set_num_threads(1)
    return [run_cohen(CohenConfig(lr=lr, steps=steps, out_dir=out_dir)) for lr in lrs]


def run_demo(cfg: DemoConfig = DemoConfig()) -> Path:
    """Run the demo; returns the report's index.html. ConfigError (before any work) for a bad config."""
    study = resolve(cfg.study)
    errors = [f"demo cohen: {e}" for lr in cfg.cohen_lrs
              for e in config_errors(CohenConfig(lr=lr, steps=cfg.cohen_steps))] + study_config_errors(study)
    if errors:
        raise ConfigError("invalid demo config:\n  - " + "\n  - ".join(errors))
    check(study)  # the runs' own configs
    t0 = time.perf_counter()
    stamp = lambda: f"[{time.perf_counter() - t0:5.0f}s]"  # noqa: E731
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every spawned process: one core each
    cohen_dir = Path(study.out) / "cohen2021"
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as side:
        # the Cohen validation needs no language model: it runs beside the warm start, which takes one worker
        print(f"{stamp()} Cohen et al. 2021 validation (full-batch GD, tanh MLP, digits) in the background",
              flush=True)
        cohen = side.submit(_cohen_runs, tuple(cfg.cohen_lrs), cfg.cohen_steps, str(cohen_dir))
        result = run_study(replace(study, title="eoslab demo: does the Edge of Stability persist in post-training?"),
                           echo=lambda s: print(f"{stamp()} {s}", flush=True), extra_report_dirs=(cohen_dir,),
                           before_report=cohen.result)  # the report holds the finished Cohen runs
    runs = find_runs([Path(study.out)])
    print(f"{stamp()} EoS phases (r = λ/θ, 1 at the edge):")
    for row in phase_rows(runs):
        if "phase" in row:
            print(f"  {row['run']:<48} {row['regime']:<8} lr={row['lr']:<8g} {row['phase']:<11} "
                  f"onset={row.get('onset_step')} max r={row['max_ratio']:.2f} [{row['status']}]")
    print(f"{stamp()} learning (held-out greedy accuracy, first -> last eval):")
    for run in runs:
        steps, acc = run.series("eval/accuracy")
        if len(acc) >= 2:
            print(f"  {run.name:<48} {run.regime:<4} {run.optimizer} lr={run.lr:<8g} "
                  f"{acc[0]:.3f} -> {acc[-1]:.3f} by step {steps[-1]:g}")
    for path in result.failed:
        print(f"  FAILED {path}")
    print(f"{stamp()} report: {result.index.resolve()}", flush=True)
    return result.index

"""``eoslab``: the command line, a thin tyro layer over the frozen config dataclasses.

    eoslab sft  [--optim.lr 1e-3 --train.steps 200 --train.full-batch ...]        one SFT run
    eoslab lora [--model.lora-rank 8 ...]                                         SFT with LoRA adapters (rank 8)
    eoslab rl   [--ppo.group-size 4 ...]                                          one RLVR (PPO) run
    eoslab sweep NAME [--dry-run] [--workers N]                                   a sweep of experiments/sweeps/
    eoslab sweep NAME --backend ray [--address auto|HOST:PORT] [--gpus-per-run 0.5]   ... as Ray tasks
    eoslab report RUN_DIRS... [--out DIR]                                         HTML + PNG report from run dirs
    eoslab cohen [--lrs 0.3 0.45]                                                 Cohen et al. 2021 validation runs
    eoslab eoss [--lrs 0.45 --batch 4]                                            Edge of Stochastic Stability runs
    eoslab demo                                                                   the whole study, small, on CPU
    eoslab study [--scale demo|small|full] [--dry-run] [--backend ray ...]        does EoS persist? calibrated grid

Every field of RunConfig is a flag (``eoslab sft --help``). Config errors (and a run dir that another process is
using) are reported in one line before any model is loaded, with exit status 2 and no traceback; a run that cannot
resume because no checkpoint is intact exits 1 with one line. Resume notices print as ``eoslab: warning: ...``.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Union

import tyro

from agents.eos_lr import ControlConfig
from agents.trainer import CheckpointError, ResumeWarning
from experiments import cohen2021, eoss
from experiments.backends import ExecutorConfig
from experiments.demo import DemoConfig, run_demo
from experiments.eoss import EossCommand
from experiments.phases import PhaseConfig
from experiments.report import ReportConfig, write_report
from experiments.run import ConfigError, RunConfig, RunDirBusy, default_config, run
from experiments.study import StudyConfig, run_study
from experiments.sweep import load_sweep, run_sweep

SFT_DEFAULT, LORA_DEFAULT, RL_DEFAULT = (default_config(c) for c in ("sft", "lora", "rl"))


@dataclass(frozen=True)
class SweepCommand:
    """Run a sweep declared in experiments/sweeps/NAME.py; runs with DONE are skipped."""

    name: tyro.conf.Positional[str]
    dry_run: bool = False  # print the planned runs (todo / done) and exit
    workers: int = 1  # parallel runs (local worker processes, or the CPUs of a local Ray)
    root: Path = Path("runs")  # runs go to ROOT/NAME/<run name>/
    report: bool = True  # write ROOT/NAME/report/index.html when the sweep ends
    only: tuple[str, ...] = ()  # run only the runs whose names match one of these shell patterns ('sft-*')
    executor: Annotated[ExecutorConfig, tyro.conf.OmitArgPrefixes] = field(default_factory=ExecutorConfig)


@dataclass(frozen=True)
class ReportCommand:
    """Build the HTML report (index.html + PNGs) from run directories or directories holding them."""

    run_dirs: tyro.conf.Positional[tuple[Path, ...]]
    out: Path = Path("runs/report")  # output directory
    delta: float = PhaseConfig.delta  # EoS band half-width δ relative to the stability threshold


@dataclass(frozen=True)
class CohenCommand:
    """Cohen et al. 2021 validation: full-batch GD on a tanh MLP (MSE, sklearn digits); one run per η."""

    lrs: tuple[float, ...] = (0.3, 0.45, 0.6)  # learning rates η, one run each (the edge is 2/η)
    steps: int = 500  # GD steps per run
    out_dir: Path = Path("runs/cohen2021")  # runs go to OUT_DIR/gd-digits-lr<η>-s0/
    schedule: str = "constant"  # constant (η = lr), or eos / cdat: an LR controller starting from each lr
    control: ControlConfig = field(default_factory=ControlConfig)  # knobs of the eos / cdat controller


Command = Union[
    Annotated[RunConfig, tyro.conf.subcommand("sft", default=SFT_DEFAULT, description="One SFT run.")],
    Annotated[RunConfig, tyro.conf.subcommand("lora", default=LORA_DEFAULT, description="One LoRA SFT run.")],
    Annotated[RunConfig, tyro.conf.subcommand("rl", default=RL_DEFAULT, description="One RLVR (PPO) run.")],
    Annotated[SweepCommand, tyro.conf.subcommand("sweep")],
    Annotated[ReportCommand, tyro.conf.subcommand("report")],
    Annotated[CohenCommand, tyro.conf.subcommand("cohen")],
    Annotated[EossCommand, tyro.conf.subcommand("eoss")],
    Annotated[DemoConfig, tyro.conf.subcommand("demo", description="The whole study, small, on CPU.")],
    Annotated[StudyConfig, tyro.conf.subcommand(
        "study", description="Does the Edge of Stability persist in SFT, LoRA and RLVR? Calibrates λ₀ per regime × "
                             "optimizer, runs the LR grid placed from it × seeds (resumable), writes the findings "
                             "page (OUT/report/index.html and findings.md).")],
]


def execute(cmd) -> int:
    """Run a parsed command; returns the exit status."""
    if isinstance(cmd, RunConfig):
        run_dir = run(cmd)  # validates first (the one check), then trains
        print(f"run dir: {run_dir}")
    elif isinstance(cmd, SweepCommand):
        try:
            sweep = load_sweep(cmd.name).only(cmd.only)
        except KeyError as e:
            raise ConfigError(e.args[0]) from None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        results = run_sweep(sweep, cmd.root, workers=cmd.workers, dry_run=cmd.dry_run, executor=cmd.executor)
        if cmd.dry_run:
            return 0
        if cmd.report:
            out = cmd.root / sweep.name / "report"
            print(f"report: {write_report([cmd.root / sweep.name], ReportConfig(out=out))}")
        return 1 if any(r.status == "error" for r in results) else 0
    elif isinstance(cmd, ReportCommand):
        if not 0 < cmd.delta < 1:
            raise ConfigError(f"--delta {cmd.delta} must be in (0, 1)")
        try:
            print(f"report: {write_report(cmd.run_dirs, ReportConfig(out=cmd.out, delta=cmd.delta))}")
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    elif isinstance(cmd, CohenCommand):
        cfgs = [cohen2021.CohenConfig(lr=lr, steps=cmd.steps, out_dir=str(cmd.out_dir), schedule=cmd.schedule,
                                      control=cmd.control) for lr in cmd.lrs]
        errors = [e for c in cfgs for e in cohen2021.config_errors(c)]
        if errors:
            raise ConfigError("; ".join(errors))
        for c in cfgs:
            print(f"run dir: {cohen2021.run_cohen(c)}")
    elif isinstance(cmd, EossCommand):
        if errors := [e for c in cmd.configs() for e in eoss.config_errors(c)]:
            raise ConfigError("; ".join(errors))
        for c in cmd.configs():
            print(f"run dir: {eoss.run_eoss(c)}")
    elif isinstance(cmd, DemoConfig):
        run_demo(cmd)
    elif isinstance(cmd, StudyConfig):
        return 1 if run_study(cmd).failed else 0
    return 0


def one_line(error: Exception) -> str:
    """A multi-line ConfigError ("invalid run config:\n  - a\n  - b") as one line."""
    first, *rest = str(error).splitlines()
    return " ".join([first] + [r.strip().removeprefix("- ") + ";" for r in rest if r.strip()]).rstrip(";")


def parse(argv: list[str] | None = None):
    """The command object for ``argv`` (a RunConfig, SweepCommand, ReportCommand, CohenCommand or DemoConfig)."""
    return tyro.cli(Command, args=argv, prog="eoslab", description=__doc__.split("\n\n")[0])


def _show_resume_warning(message, category, filename, lineno, file=None, line=None):
    """One ``eoslab: warning:`` line for the trainer's resume notices; any other warning as Python shows it."""
    if issubclass(category, ResumeWarning):
        print(f"eoslab: warning: {message}", file=sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Console entry point (``eoslab``)."""
    cmd = parse(argv)
    shown, warnings.showwarning = warnings.showwarning, _show_resume_warning
    try:
        return execute(cmd)
    except (ConfigError, RunDirBusy) as e:
        print(f"eoslab: error: {one_line(e)}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"eoslab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("eoslab: interrupted (runs resume from their last checkpoint)", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())

"""Sweeps declared in Python and run by local worker processes or Ray tasks.

A sweep is a name plus a tuple of ``RunConfig``s (``experiments/sweeps/<name>.py`` defines ``SWEEP``). Running it
puts every run under ``<root>/<sweep name>/<run name>/`` and is idempotent: a run whose directory holds ``DONE`` is
skipped, an interrupted one resumes from its latest checkpoint (``experiments.run.run``). Local workers are spawned
processes with ``cpus_per_run`` (default 1) torch threads and ``OMP_NUM_THREADS`` each, so N workers use N cores
without oversubscription; a run that raises is reported and the sweep goes on. ``--backend ray`` runs each run as a
Ray task instead (``experiments.backends``): same run dirs, same results, and a run whose worker dies is retried
by Ray and resumes from its checkpoint.

    eoslab sweep sft_lr --dry-run
    eoslab sweep sft_lr --workers 2
    eoslab sweep adaptive_lr --only 'sft-*'    # part of a sweep: the runs whose names match
    eoslab sweep sft_lr --backend ray [--address auto] [--cpus-per-run 1] [--gpus-per-run 0.5]
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import json
import os
import pkgutil
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

import experiments.sweeps
from agents.embedded import embedded_model_path
from agents.trainer import FINAL_MODEL
from experiments.backends import ExecutorConfig, RaySession, check_executor, set_threads
from experiments.run import RunConfig, check_run_dir, replace, run, run_name, validate


# model.name placeholder: "the final model of this sweep's warm_start run" (e.g. RLVR from an SFT'd model)
WARM_START = "warm-start"


@dataclass(frozen=True)
class Sweep:
    name: str
    configs: tuple[RunConfig, ...]
    description: str = ""
    warm_start: RunConfig | None = None  # run first; configs with model.name == WARM_START start from its model

    def __post_init__(self) -> None:
        object.__setattr__(self, "configs", tuple(self.configs))  # a list would make the frozen sweep mutable
        names = [run_name(c) for c in self.configs + ((self.warm_start,) if self.warm_start else ())]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sweep {self.name!r}: several configs share the run name(s) {dup}; set distinct names")

    def only(self, patterns: Iterable[str]) -> "Sweep":
        """The same sweep (same name, so the same run dirs) holding only the runs whose name matches one of the
        shell-style ``patterns`` (``sft-*``), and its warm start only when a kept run starts from it; ValueError
        when a pattern matches no run (a typo would otherwise run nothing, silently)."""
        patterns = tuple(patterns)
        if not patterns:
            return self
        names = [run_name(c) for c in self.configs]
        if unmatched := [p for p in patterns if not fnmatch.filter(names, p)]:
            raise ValueError(f"sweep {self.name!r}: no run name matches {unmatched} (names look like {names[0]!r})")
        kept = tuple(c for c, n in zip(self.configs, names) if any(fnmatch.fnmatchcase(n, p) for p in patterns))
        warm = self.warm_start if any(c.model.name == WARM_START for c in kept) else None
        return dataclasses.replace(self, configs=kept, warm_start=warm)


def grid(base: RunConfig, lrs: Iterable[float] = (), ranks: Iterable[int] = (), seeds: Iterable[int] = ()) -> tuple:
    """Cartesian product over learning rates × LoRA ranks × seeds (an empty axis keeps the base value)."""
    out = []
    for rank in tuple(ranks) or (base.model.lora_rank,):
        for lr in tuple(lrs) or (base.optim.lr,):
            for seed in tuple(seeds) or (base.train.seed,):
                out.append(replace(base, model={"lora_rank": rank}, optim={"lr": lr}, train={"seed": seed}))
    return tuple(out)


@dataclass(frozen=True)
class PlannedRun:
    config: RunConfig
    run_dir: Path
    done: bool
    prerequisite: bool = False  # a warm-start run: executed before every other run


def plan(sweep: Sweep, root: str | Path = "runs") -> list[PlannedRun]:
    """The sweep's runs with their directories under ``root/sweep.name``; validates every config first."""
    out_dir = str(Path(root) / sweep.name)
    planned, warm_model = [], None
    if sweep.warm_start is not None:
        cfg = dataclasses.replace(sweep.warm_start, out_dir=out_dir)
        validate(cfg)
        run_dir = Path(out_dir) / run_name(cfg)
        warm_model = run_dir / FINAL_MODEL
        planned.append(PlannedRun(cfg, run_dir, (run_dir / "DONE").exists() and check_run_dir(cfg, run_dir),
                                  prerequisite=True))
    for cfg in sweep.configs:
        cfg = dataclasses.replace(cfg, out_dir=out_dir)
        if cfg.model.name == WARM_START:
            if warm_model is None:
                raise ValueError(f"sweep {sweep.name!r}: model.name={WARM_START!r} needs Sweep.warm_start")
            cfg = replace(cfg, model={"name": str(warm_model)})
            # the warm-start model may not exist yet: validate the rest of the config
            validate(cfg if warm_model.exists() else replace(cfg, model={"name": "embedded"}))
        else:
            validate(cfg)
        run_dir = Path(out_dir) / run_name(cfg)
        # a finished run counts as done only if it ran this very config (and is not to be overwritten): a sweep
        # whose configs changed raises a ConfigError here, before any training, rather than reporting old runs
        # under new settings
        done = not cfg.overwrite and (run_dir / "DONE").exists() and check_run_dir(cfg, run_dir)
        planned.append(PlannedRun(cfg, run_dir, done))
    return planned


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    status: str  # status.json's status ("completed", "diverged", ...), "skipped" (DONE before), or "error"
    seconds: float
    error: str = ""


def _run_one(cfg: RunConfig) -> RunResult:
    """Run one config in this process; never raises (a failed run must not stop the sweep)."""
    t0 = time.perf_counter()
    run_dir = Path(cfg.out_dir) / run_name(cfg)
    try:
        run(cfg, progress=False)
        status = json.loads((run_dir / "status.json").read_text()).get("status", "?")
        return RunResult(run_dir, status, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - reported per run, with the traceback's last frame
        tb = traceback.extract_tb(e.__traceback__)[-1]
        where = f" ({Path(tb.filename).name}:{tb.lineno})" if tb else ""
        return RunResult(run_dir, "error", time.perf_counter() - t0, f"{type(e).__name__}: {e}{where}")


def run_sweep(sweep: Sweep, root: str | Path = "runs", workers: int = 1, dry_run: bool = False,
              echo: Callable[[str], None] = print, executor: ExecutorConfig = ExecutorConfig()) -> list[RunResult]:
    """Run the sweep's pending runs on ``workers`` processes (1 = in this process) or as Ray tasks
    (``executor.backend="ray"``); returns one result per run."""
    check_executor(executor)
    planned = plan(sweep, root)
    echo(f"sweep {sweep.name}: {len(planned)} runs, {sum(p.done for p in planned)} done -> {Path(root) / sweep.name}")
    return execute(planned, workers=workers, dry_run=dry_run, echo=echo, executor=executor)


def execute(planned: list[PlannedRun], workers: int = 1, dry_run: bool = False,
            echo: Callable[[str], None] = print, executor: ExecutorConfig = ExecutorConfig()) -> list[RunResult]:
    """Run the not-yet-done ``planned`` runs, in order, on ``workers`` processes (``executor.backend="process"``)
    or as Ray tasks (``"ray"``: ``workers`` sizes a local Ray, a cluster's resources size a joined one); skipped
    runs are reported too. Warm starts finish before the other runs begin. ConfigError for a bad ``executor``."""
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    check_executor(executor)
    pending = [p for p in planned if not p.done]
    for p in planned:
        c = p.config
        echo(f"  [{'done' if p.done else 'todo'}] {p.run_dir}  regime={c.regime} lr={c.optim.lr:g} "
             f"lora_rank={c.model.lora_rank} steps={c.train.steps}" + ("  (warm start)" if p.prerequisite else ""))
    results = [RunResult(p.run_dir, "skipped", 0.0) for p in planned if p.done]
    if dry_run or not pending:
        return results
    first = [p for p in pending if p.prerequisite]
    pending = [p for p in pending if not p.prerequisite]
    t0 = time.perf_counter()
    if executor.backend == "ray":
        with RaySession(executor, workers) as ray:  # joined or started first: a bad address fails fast
            _build_embedded(first + pending)
            for what, batch in (("warm start ", first), ("", pending)):
                for i, (k, out) in enumerate(ray.map(_run_one, [p.config for p in batch]), 1):
                    res = out if isinstance(out, RunResult) else RunResult(  # its worker died past the retries
                        batch[k].run_dir, "error", 0.0, f"{_first_line(out)} ({executor.max_retries} retries)")
                    results.append(res)
                    _echo_result(echo, res, i, len(batch), t0, what)
        return results
    _build_embedded(first + pending)
    os.environ["OMP_NUM_THREADS"] = str(executor.cpus_per_run)  # inherited by the spawned workers
    for i, p in enumerate(first, 1):  # warm starts, in this process, before the runs that start from them
        res = _run_one(p.config)
        results.append(res)
        _echo_result(echo, res, i, len(first), t0, "warm start ")
    if not pending:
        return results
    if workers == 1:
        for i, p in enumerate(pending, 1):
            res = _run_one(p.config)
            results.append(res)
            _echo_result(echo, res, i, len(pending), t0)
        return results
    with ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=get_context("spawn"),
                             initializer=set_threads, initargs=(executor.cpus_per_run,)) as pool:
        futures = [pool.submit(_run_one, p.config) for p in pending]
        for i, fut in enumerate(as_completed(futures), 1):
            res = fut.result()
            results.append(res)
            _echo_result(echo, res, i, len(pending), t0)
    return results


def _build_embedded(planned: list[PlannedRun]) -> None:
    if any(p.config.model.name == "embedded" for p in planned):
        embedded_model_path()  # build once here, not in every worker (they would wait on its lock anyway)


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0].strip() if lines else ''}"


def _echo_result(echo, res: RunResult, i: int, n: int, t0: float, what: str = "") -> None:
    msg = f"  ({what}{i}/{n}, {time.perf_counter() - t0:.0f}s) {res.run_dir.name}: {res.status} in {res.seconds:.0f}s"
    echo(msg + (f" -- {res.error}" if res.error else ""))


def available_sweeps() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(experiments.sweeps.__path__) if not m.name.startswith("_"))


def load_sweep(name: str) -> Sweep:
    """``experiments.sweeps.<name>.SWEEP``."""
    if name not in available_sweeps():
        raise KeyError(f"unknown sweep {name!r}; available: {', '.join(available_sweeps())}")
    sweep = importlib.import_module(f"experiments.sweeps.{name}").SWEEP
    if not isinstance(sweep, Sweep):
        raise TypeError(f"experiments.sweeps.{name}.SWEEP must be a Sweep, got {type(sweep).__name__}")
    return sweep

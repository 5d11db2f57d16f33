"""Where the runs of a sweep or study execute: local worker processes (the default) or Ray tasks.

``--backend ray`` submits every run as one Ray task that asks for ``cpus_per_run`` CPUs (its torch threads and
``OMP_NUM_THREADS``) and ``gpus_per_run`` GPUs (a fraction shares a GPU). Without ``--address`` a local Ray with
``workers × cpus_per_run`` CPUs is started and shut down again; ``--address auto|HOST:PORT|ray://...`` joins a running
cluster, whose free resources then decide how many runs go at once. A run whose worker dies (killed, OOM, lost
node) is retried by Ray itself (``max_retries``); the retry calls ``experiments.run.run`` again, which resumes from the
run's latest intact checkpoint, so the results land in the same run dirs as with local workers. On a cluster the
run dirs (and a local ``model.name``) must be on a filesystem that every node sees at the same path. ``ray`` is
imported only here and only for ``--backend ray`` (``pip install "eoslab[ray]"``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from experiments.errors import ConfigError

BACKENDS = ("process", "ray")


@dataclass(frozen=True)
class ExecutorConfig:
    """Where runs execute; the resource flags apply to each run."""

    backend: str = "process"  # process (local worker processes) or ray (one Ray task per run)
    address: str | None = None  # ray: join this cluster (auto, HOST:PORT, ray://HOST:PORT); None: start a local Ray
    cpus_per_run: int = 1  # CPU threads per run (torch threads, OMP_NUM_THREADS; the Ray task's num_cpus)
    gpus_per_run: float = 0.0  # ray: GPUs per run (the task's num_gpus; 0.5 = two runs share a GPU)
    max_retries: int = 3  # ray: restarts of a run whose worker died; each resumes from the run's last checkpoint


def executor_errors(e: ExecutorConfig) -> list[str]:
    """Every problem with ``e`` (unknown backend, ray not installed, bad resources); [] when it is usable."""
    errors = []
    if e.backend not in BACKENDS:
        errors.append(f"backend={e.backend!r} is not one of {', '.join(BACKENDS)}")
    if not (isinstance(e.cpus_per_run, int) and e.cpus_per_run >= 1):
        errors.append(f"cpus_per_run={e.cpus_per_run} must be an integer >= 1")
    gpus = e.gpus_per_run
    if not (math.isfinite(gpus) and gpus >= 0 and (gpus <= 1 or float(gpus).is_integer())):
        errors.append(f"gpus_per_run={gpus} must be a fraction in [0, 1] or a whole number of GPUs")
    if e.max_retries < 0:
        errors.append(f"max_retries={e.max_retries} must be >= 0")
    if e.backend == "process":
        if gpus:
            errors.append(f"gpus_per_run={gpus} needs --backend ray (local workers run on model.device)")
        if e.address is not None:
            errors.append(f"address={e.address!r} needs --backend ray")
    if e.backend == "ray" and importlib.util.find_spec("ray") is None:
        errors.append('backend=ray needs the ray package: pip install "eoslab[ray]"')
    return errors


def check_executor(e: ExecutorConfig) -> None:
    """ConfigError listing every problem with ``e``; nothing is started."""
    if errors := executor_errors(e):
        raise ConfigError("invalid executor:\n  - " + "\n  - ".join(errors))


def set_threads(n: int) -> None:
    """``n`` torch threads in this process; ``OMP_NUM_THREADS`` for the processes it starts."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def _in_task(fn: Callable[[Any], Any], arg: Any, threads: int) -> Any:
    set_threads(threads)
    return fn(arg)


class RaySession:
    """Ray for one ``execute``: joins ``address`` or starts a local Ray (shut down on exit, unless it was running)."""

    def __init__(self, e: ExecutorConfig, workers: int):
        self.e, self.workers, self.started = e, workers, False

    def __enter__(self) -> "RaySession":
        import ray

        if not ray.is_initialized():
            code_root = str(Path(__file__).resolve().parent.parent)  # workers import the driver's eoslab
            path = os.pathsep.join(p for p in (code_root, os.environ.get("PYTHONPATH")) if p)
            kw: dict[str, Any] = dict(runtime_env={"env_vars": {"PYTHONPATH": path}}, logging_level="WARNING")
            if self.e.address is None:
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # an offline lab: no usage reports
                kw.update(num_cpus=self.workers * self.e.cpus_per_run, include_dashboard=False,
                          object_store_memory=128 * 2**20)  # configs and results only: a small store
            try:
                ray.init(address=self.e.address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise ConfigError(f"address={self.e.address!r}: cannot start or join Ray: {err}") from None
            self.started = True
        try:
            have = ray.cluster_resources()
            for key, want in (("CPU", self.e.cpus_per_run), ("GPU", self.e.gpus_per_run)):
                if want and have.get(key, 0) < want:
                    raise ConfigError(f"each run asks for {want:g} {key} but the Ray cluster has {have.get(key, 0):g}"
                                      f" (--{key.lower()}s-per-run)")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False

    def map(self, fn: Callable[[Any], Any], args: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """``fn(arg)`` for every arg, one Ray task each; yields ``(index, value)`` as tasks finish. A task whose
        worker died more than ``max_retries`` times yields its Ray exception as the value."""
        import ray

        e = self.e
        # Ray itself sets OMP_NUM_THREADS=num_cpus in the task's worker; _in_task sets torch's threads
        task = ray.remote(_in_task).options(num_cpus=e.cpus_per_run, num_gpus=e.gpus_per_run,
                                            max_retries=e.max_retries, retry_exceptions=False)
        refs = [task.remote(fn, a, e.cpus_per_run) for a in args]
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayError as err:  # the worker died past its retries, the node was lost, ...
                    value = err
                yield index[ref], value

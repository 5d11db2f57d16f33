"""``--backend ray``: a 4-run sweep on a local 2-CPU Ray survives a worker killed mid-run (Ray retries the task, the
run resumes from its checkpoint and ends bitwise equal to its uninterrupted twin); CLI flags; config errors before
any training. All Ray tests are in this file (pytest-xdist --dist loadfile keeps them on one worker)."""

import json
import os
import signal
import threading
import time

import psutil
import pytest
import ray  # the ray extra is part of `make test`
from safetensors.torch import load_file

from agents.optim import OptimConfig
from agents.trainer import FINAL_MODEL, TrainConfig, read_metrics
from experiments.backends import ExecutorConfig, executor_errors
from experiments.cli import main, parse
from experiments.run import ConfigError, EnvConfig, ModelConfig, RunConfig, replace
from experiments.sweep import Sweep, execute, plan
from probes import ProbeConfig


def tiny(model_dir, name: str, lr: float = 0.05) -> RunConfig:
    return RunConfig(
        model=ModelConfig(name=str(model_dir)),
        env=EnvConfig(n_train=8, n_eval=2),
        optim=OptimConfig(name="sgd", lr=lr, momentum=0.9),
        train=TrainConfig(steps=60, micro_batch=2, grad_accum=2, eval_every=0, retention_every=0, retention_tokens=0,
                          checkpoint_every=1, eval_max_new_tokens=4, n_samples=0),
        probe=ProbeConfig(every=0),
        name=name,
    )


def raylets() -> set[int]:
    return {p.pid for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith(("raylet", "gcs_server"))}


@pytest.fixture
def no_stray_ray():
    before = raylets()
    yield
    if ray.is_initialized():
        ray.shutdown()
    deadline = time.time() + 30
    while raylets() - before and time.time() < deadline:
        time.sleep(0.2)
    assert not raylets() - before, "Ray processes left running"


def kill_when_checkpointed(run_dir, step: int, killed: list, stop: threading.Event) -> None:
    """SIGKILL the process running ``run_dir`` (its pid is in .lock) once checkpoint ``step`` is on disk."""
    while not stop.is_set():
        if (run_dir / "checkpoints" / f"step_{step}").exists() and not (run_dir / "DONE").exists():
            pid = int((run_dir / ".lock").read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.005)


def test_a_killed_worker_is_retried_and_its_run_resumes_bitwise(tiny_model_dir, tmp_path, no_stray_ray):
    configs = (tiny(tiny_model_dir, "killed"), tiny(tiny_model_dir, "twin"),  # same run, two names
               tiny(tiny_model_dir, "lr2", lr=0.02), tiny(tiny_model_dir, "lr1", lr=0.01))
    planned = plan(Sweep("ray", configs), tmp_path)
    victim = planned[0].run_dir
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=kill_when_checkpointed, args=(victim, 2, killed, stop), daemon=True)
    killer.start()
    lines = []
    try:
        results = execute(planned, workers=2, echo=lines.append, executor=ExecutorConfig(backend="ray", max_retries=2))
    finally:
        stop.set()
        killer.join()
    assert not ray.is_initialized()  # the backend shut down the Ray it started
    assert killed, "the run ended before it could be killed"
    by_name = {r.run_dir.name: r for r in results}
    assert {n: r.status for n, r in by_name.items()} == dict.fromkeys(("killed", "twin", "lr2", "lr1"), "completed")
    assert sum(": completed in " in line for line in lines) == 4  # the process backend's echo lines
    resumed = json.loads((victim / "config.json").read_text())["resumed"]
    assert len(resumed) == 1 and 2 <= resumed[0]["from_step"] < 60  # resumed mid-run, from its own checkpoint
    assert int((victim / ".lock").read_text()) != killed[0]  # by another worker process
    twin = planned[1].run_dir
    assert read_metrics(victim, wall_clock=False) == read_metrics(twin, wall_clock=False)
    assert [r["step"] for r in read_metrics(victim)] == list(range(61))
    a = load_file(str(victim / FINAL_MODEL / "model.safetensors"))
    b = load_file(str(twin / FINAL_MODEL / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert all((p.run_dir / "DONE").exists() for p in planned)


def test_backend_flags_parse_for_sweep_and_study():
    cmd = parse(["sweep", "sft_lr", "--backend", "ray", "--address", "auto", "--cpus-per-run", "2",
                 "--gpus-per-run", "0.5", "--max-retries", "5"])
    assert cmd.executor == ExecutorConfig("ray", "auto", 2, 0.5, 5)
    assert parse(["sweep", "sft_lr"]).executor == ExecutorConfig()  # the process pool stays the default
    assert parse(["study", "--backend", "ray", "--address", "10.0.0.1:6379"]).executor.address == "10.0.0.1:6379"


def test_dry_run_on_ray_starts_nothing(tmp_path, capsys):
    assert main(["sweep", "sft_lr", "--backend", "ray", "--dry-run", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("[todo]") == 5 and not ray.is_initialized()


@pytest.mark.parametrize("flags, message", [
    (["--backend", "slurm"], "backend='slurm' is not one of process, ray"),
    (["--backend", "ray", "--cpus-per-run", "0"], "cpus_per_run=0 must be an integer >= 1"),
    (["--backend", "ray", "--gpus-per-run", "1.5"], "gpus_per_run=1.5 must be a fraction in [0, 1] or a whole"),
    (["--backend", "ray", "--max-retries", "-1"], "max_retries=-1 must be >= 0"),
    (["--gpus-per-run", "0.5"], "gpus_per_run=0.5 needs --backend ray"),
    (["--address", "auto"], "address='auto' needs --backend ray"),
])
def test_config_errors_exit_2_before_any_run(tmp_path, capsys, flags, message):
    assert main(["sweep", "sft_lr", "--root", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eoslab: error: invalid executor:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "sft_lr").exists() and not ray.is_initialized()
    assert main(["study", "--out", str(tmp_path / "study"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "study").exists()


def test_ray_not_installed_is_a_config_error(monkeypatch, tiny_model_dir, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    assert executor_errors(ExecutorConfig(backend="ray")) == ['backend=ray needs the ray package: pip install '
                                                            '"eoslab[ray]"']
    planned = plan(Sweep("x", (tiny(tiny_model_dir, "a"),)), tmp_path)
    with pytest.raises(ConfigError, match="needs the ray package"):
        execute(planned, executor=ExecutorConfig(backend="ray"))
    assert not planned[0].run_dir.exists()


def test_resources_the_cluster_lacks_are_a_config_error(tiny_model_dir, tmp_path, no_stray_ray):
    planned = plan(Sweep("x", (replace(tiny(tiny_model_dir, "a"), train={"steps": 1}),)), tmp_path)
    with pytest.raises(ConfigError, match="each run asks for 1 GPU but the Ray cluster has 0"):
        execute(planned, executor=ExecutorConfig(backend="ray", gpus_per_run=1))
    assert not planned[0].run_dir.exists() and not ray.is_initialized()


def test_a_study_on_ray_starts_ray_once(tiny_model_dir, tmp_path, monkeypatch, no_stray_ray):
    # the calibrations and the sweeps are two execute() calls: one Ray session serves both
    from experiments import study

    inits, init = [], ray.init
    monkeypatch.setattr(ray, "init", lambda *a, **k: inits.append(1) or init(*a, **k))
    cfg = study.StudyConfig(out=tmp_path / "s", model=str(tiny_model_dir), workers=1, regimes=("sft",),
                            optimizers=("gd",), seeds=(0,), ratios=(1.0,), steps=2, probe_every=1, probe_set_size=8,
                            gd_n_train=16, batch_sharpness_every=0, n_eval=2, checkpoint_every=0,
                            executor=ExecutorConfig(backend="ray"))
    result = study.run_study(cfg, echo=lambda s: None)
    assert result.index is not None and not result.failed
    assert len(inits) == 1 and not ray.is_initialized()

"""Run directories through run() and the CLI: finished runs are never silently reused, one process per run dir,
clean one-line errors (exit 2) that leave no orphan run dir, and every numeric config field checked up front."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.cli import main
from experiments.run import ConfigError, replace, run, run_name, validate
from test_run import tiny_cfg


def cli_args(model_dir, out_dir, *extra, name="r"):
    return ["sft", "--model.name", str(model_dir), "--out-dir", str(out_dir), "--name", name,
            "--env.n-train", "8", "--env.n-eval", "2", "--train.steps", "2", "--train.micro-batch", "2",
            "--train.grad-accum", "2", "--train.eval-every", "0", "--train.retention-every", "0",
            "--train.retention-tokens", "0", "--train.eval-max-new-tokens", "4", "--train.n-samples", "1",
            "--train.max-length", "64", "--probe.every", "0", "--optim.lr", "0.05", "--replay.weight", "0",
            *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other_model"), seed=1)


@pytest.mark.parametrize("change, field", [
    (["--optim.momentum", "0.5"], "optim.momentum"),
    (["--optim.weight-decay", "0.01"], "optim.weight_decay"),
    (["--train.steps", "3"], "train.steps"),
    (["--env.n-train", "12"], "env.n_train"),
    ("model", "model.name"),
])
def test_a_finished_run_is_not_reused_for_another_config(tiny_model_dir, other_model_dir, tmp_path, capsys, change,
                                                         field):
    out = tmp_path / "runs"
    assert main(cli_args(tiny_model_dir, out)) == 0
    run_dir = out / "r"
    metrics = (run_dir / "metrics.jsonl").read_text()
    args = cli_args(other_model_dir, out) if change == "model" else cli_args(tiny_model_dir, out, *change)
    capsys.readouterr()
    assert main(args) == 2
    err = one_error_line(capsys)
    assert field in err and "DONE" in err and "--name" in err and "--overwrite" in err
    assert ("to continue it" in err) == (field == "train.steps")  # only a resumable change can continue the run
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # untouched
    assert main(args + ["--overwrite"]) == 0  # the explicit way to replace it
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    assert saved["overwrite"] is True and saved["model"]["name"] == args[args.index("--model.name") + 1]
    capsys.readouterr()
    assert main(args) == 0  # the same config again (without --overwrite): a skip
    assert "run dir:" in capsys.readouterr().out


def test_identical_config_on_a_finished_run_is_a_fast_skip(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    assert main(cli_args(tiny_model_dir, out)) == 0
    stamp = (out / "r" / "metrics.jsonl").stat().st_mtime_ns
    import agents.policy

    def no_load(*args, **kwargs):  # a skip loads no model (a wall-clock bound would be flaky on a busy machine)
        raise AssertionError("a finished run with the same config loaded a model")

    monkeypatch.setattr(agents.policy.LMPolicy, "from_pretrained", no_load)
    assert main(cli_args(tiny_model_dir, out)) == 0
    assert (out / "r" / "metrics.jsonl").stat().st_mtime_ns == stamp


def test_a_second_process_on_the_same_run_dir_is_refused(tiny_model_dir, tmp_path, capsys):
    """A real second process runs in the dir; this one exits 2. Killed with SIGKILL, it blocks nothing."""
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-m", "experiments.cli",
                               *cli_args(tiny_model_dir, out, "--train.steps", "1000000",
                                         "--train.checkpoint-every", "0")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not (out / "r" / "metrics.jsonl").exists():  # it is training
            assert holder.poll() is None and time.time() < deadline
            time.sleep(0.2)
        capsys.readouterr()
        assert main(cli_args(tiny_model_dir, out)) == 2
        err = one_error_line(capsys)
        assert "in use by another process" in err and str(holder.pid) in err
        assert holder.poll() is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(cli_args(tiny_model_dir, out)) == 0  # the dead holder's lock is gone (no checkpoint: starts over)
    rows = [json.loads(line) for line in (out / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]


def test_resume_with_steps_below_the_last_checkpoint_is_a_config_error(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(cli_args(tiny_model_dir, out, "--train.steps", "4", "--train.checkpoint-every", "2")) == 0
    run_dir = out / "r"
    # what a run killed after its step-2 checkpoint leaves behind... with a later checkpoint kept by hand
    (run_dir / "DONE").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "final_model")
    (run_dir / "status.json").write_text(json.dumps({"status": "running", "step": 4, "reason": ""}))
    before = (run_dir / "status.json").read_text()
    capsys.readouterr()
    assert main(cli_args(tiny_model_dir, out, "--train.steps", "3", "--train.checkpoint-every", "2")) == 2
    err = one_error_line(capsys)
    assert "step 4" in err and "train.steps=3" in err
    assert (run_dir / "status.json").read_text() == before


@pytest.mark.parametrize("flags, field", [
    (["--optim.weight-decay", "nan"], "optim.weight_decay"),
    (["--optim.name", "adam", "--optim.eps", "nan"], "optim.eps"),
    (["--optim.lr", "inf"], "optim.lr"),
    (["--optim.grad-clip", "inf"], "optim.grad_clip"),
    (["--train.divergence-loss", "inf"], "train.divergence_loss"),
    (["--model.lora-alpha", "inf"], "model.lora_alpha"),
    (["--probe.tol", "nan"], "probe.tol"),
    (["--probe.batch-rse", "inf"], "probe.batch_rse"),
    (["--ppo.kl-coef", "nan"], "ppo.kl_coef"),
    (["--env.kwargs", "parens", "nan"], "env.kwargs.parens"),
])
def test_non_finite_numbers_are_config_errors(tiny_model_dir, tmp_path, capsys, flags, field):
    out = tmp_path / "runs"
    args = cli_args(tiny_model_dir, out, *flags)
    if field.startswith("ppo."):
        args[0] = "rl"
    assert main(args) == 2
    assert field in one_error_line(capsys)
    assert not out.exists() or not any(out.iterdir())


def _empty(p: Path, model: Path) -> str:
    p.mkdir()
    return str(p)


def _bad_config(p: Path, model: Path) -> str:
    shutil.copytree(model, p)
    (p / "config.json").write_text('{"model_type": "gpt_neox", ')
    return str(p)


def _garbage_weights(p: Path, model: Path) -> str:
    shutil.copytree(model, p)
    (p / "model.safetensors").write_bytes(os.urandom(4096))
    return str(p)


def _truncated_weights(p: Path, model: Path) -> str:
    shutil.copytree(model, p)
    w = p / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return str(p)


def _a_file(p: Path, model: Path) -> str:
    p.write_text("not a model")
    return str(p)


@pytest.mark.parametrize("make, fragment", [
    (_empty, "no config.json"), (_bad_config, "config.json is not valid JSON"),
    (_garbage_weights, "model.safetensors"), (_truncated_weights, "model.safetensors"), (_a_file, "is a file"),
])
def test_a_broken_model_dir_is_one_line_exit_2_and_no_run_dir(tiny_model_dir, tmp_path, capsys, make, fragment):
    out = tmp_path / "runs"
    model = make(tmp_path / "model", Path(tiny_model_dir))
    assert main(cli_args(model, out)) == 2
    err = one_error_line(capsys)
    assert "model.name" in err and fragment in err
    assert not (out / "r").exists()


def test_out_dir_that_is_a_file_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("a file")
    for out in (blocker, blocker / "sub"):
        assert main(cli_args(tiny_model_dir, out)) == 2
        assert "is a file" in one_error_line(capsys)
    assert blocker.read_text() == "a file"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line_exit_2(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(cli_args(tiny_model_dir, out, "--model.device", "cuda")) == 2
    assert "CUDA is not available" in one_error_line(capsys)
    assert not (out / "r").exists()


def test_a_load_failure_after_validation_leaves_no_run_dir(tiny_model_dir, tmp_path, monkeypatch):
    """Backstop for what header checks cannot see: any load failure is a ConfigError and the new dir goes away."""
    from agents.policy import LMPolicy

    def broken(*a, **k):
        raise OSError("tokenizer.json is corrupt\nsecond line")

    monkeypatch.setattr(LMPolicy, "from_pretrained", broken)
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "runs")
    with pytest.raises(ConfigError, match="cannot be loaded.*tokenizer.json is corrupt$"):
        run(cfg, progress=False)
    assert not (tmp_path / "runs" / run_name(cfg)).exists()


def test_overwrite_is_a_run_argument_too(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tmp_path, name="o")
    run(cfg, progress=False)
    with pytest.raises(ConfigError, match="optim.momentum"):
        run(replace(cfg, optim={"momentum": 0.0}), progress=False)
    run_dir = run(replace(cfg, optim={"momentum": 0.0}, overwrite=True), progress=False)
    assert json.loads((run_dir / "config.json").read_text())["config"]["optim"]["momentum"] == 0.0
    validate(replace(cfg, overwrite=True))
    assert math.isfinite(json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["train/loss"])


def test_corrupt_checkpoints_through_the_cli(tiny_model_dir, tmp_path, capsys):
    """Newest checkpoint corrupt: one warning line, resumed from the older one (exit 0). None intact: one error
    line, exit 1, status failed."""
    out = tmp_path / "runs"
    args = cli_args(tiny_model_dir, out, "--train.steps", "4", "--train.checkpoint-every", "2")
    assert main(args) == 0
    run_dir = out / "r"
    (run_dir / "DONE").unlink()  # as if it had been stopped after its last checkpoint
    weights = run_dir / "checkpoints" / "step_4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("eoslab: warning:")]
    assert len(warning) == 1 and "step_4" in warning[0] and "sha256" in warning[0]
    assert "Traceback" not in err and json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    (run_dir / "DONE").unlink()
    for step in (2, 4):
        (run_dir / "checkpoints" / f"step_{step}" / "rng.pt").write_bytes(b"\x00" * 10)
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("eoslab: error:") and "no intact checkpoint" in err[-1]
    assert all(line.startswith("eoslab: ") for line in err if "Loading weights" not in line)  # HF's own bar
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"

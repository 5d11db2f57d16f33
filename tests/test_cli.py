"""eoslab CLI: every knob of the user's setup reachable, one-line config errors with exit 2, sweep/report/cohen
subcommands."""

import json
import subprocess
import sys

from experiments.cli import main, one_line, parse
from experiments.run import ConfigError, default_config


def test_run_subcommands_and_seed_knobs():
    assert parse(["sft"]) == default_config("sft") and parse(["rl"]) == default_config("rl")
    lora = parse(["lora"])
    assert lora == default_config("lora") and lora.regime == "sft" and lora.model.lora_rank == 8
    assert parse(["lora", "--model.lora-rank", "32"]).model.lora_rank == 32
    assert parse(["rl", "--ppo.group-size", "8"]).ppo.group_size == 8
    cfg = parse(["sft", "--optim.name", "sgd", "--optim.lr", "1e-4", "--optim.momentum", "0.9",
                 "--optim.weight-decay", "1e-4", "--train.micro-batch", "4", "--train.grad-accum", "4",
                 "--probe.every", "5", "--train.full-batch", "--env.n-train", "64"])
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (1e-4, 0.9, 1e-4)
    assert cfg.train.micro_batch * cfg.train.grad_accum == 16 and cfg.train.full_batch
    assert cfg.probe.every == 5 and cfg.env.n_train == 64
    gpu = parse(["sft", "--train.autocast", "bfloat16", "--model.head-chunk", "1024", "--probe.critical-chunks", "0",
                 "--probe.batch-lambda-max"])
    assert (gpu.train.autocast, gpu.model.head_chunk, gpu.probe.critical_chunks, gpu.probe.batch_lambda_max) == \
        ("bfloat16", 1024, 0, True)


def test_env_kwargs_parse_with_their_types(capsys):
    cfg = parse(["sft", "--env.env-id", "AlpacaSFT-v0", "--env.kwargs", "path", "/tmp/x.json"])
    assert cfg.env.env_id == "AlpacaSFT-v0" and cfg.env.kwargs == {"path": "/tmp/x.json"}
    knobs = parse(["rl", "--env.kwargs", "max_digits", "3", "parens", "0.5", "nonnegative", "False", "ops", "+-*"])
    assert knobs.env.kwargs == {"max_digits": 3, "parens": 0.5, "nonnegative": False, "ops": "+-*"}
    assert main(["sft", "--env.kwargs", "max_digit", "3"]) == 2  # typo: rejected before any model load
    assert "['max_digit'] not accepted by ArithRLVR-v0" in capsys.readouterr().err


def test_config_errors_are_one_line_with_exit_2(capsys):
    assert main(["sft", "--optim.lr", "-1", "--train.steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "optim.lr=-1.0" in err and "train.steps=0" in err
    assert one_line(ConfigError("invalid run config:\n  - a\n  - b")) == "invalid run config: a; b"
    assert main(["sweep", "nope"]) == 2
    assert "available" in capsys.readouterr().err
    assert main(["cohen", "--lrs", "-0.1"]) == 2
    assert main(["report", "/nonexistent/runs"]) == 2
    assert main(["demo", "--study.workers", "0", "--cohen-lrs", "-1"]) == 2
    err = capsys.readouterr().err
    assert "study.workers=0" in err and "demo cohen" in err


def test_console_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "experiments.cli", "lora", "--model.lora-rank", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "model.lora_rank=-1" in proc.stderr


def test_sweep_dry_run(tmp_path, capsys):
    assert main(["sweep", "sft_lr", "--dry-run", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("[todo]") == 5 and "lr=0.0001" in out and "lr=0.01" in out
    assert not (tmp_path / "sft_lr").exists()
    assert main(["sweep", "sft_lr", "--dry-run", "--root", str(tmp_path), "--only", "*lr0.001*", "*lr0.01*"]) == 0
    out = capsys.readouterr().out
    assert out.count("[todo]") == 2 and "lr=0.0001" not in out
    assert main(["sweep", "sft_lr", "--dry-run", "--only", "typo*"]) == 2
    assert "no run name matches ['typo*']" in capsys.readouterr().err


def test_one_run_and_report_through_the_cli(tiny_model_dir, tmp_path, capsys):
    args = ["sft", "--model.name", str(tiny_model_dir), "--out-dir", str(tmp_path / "runs"), "--name", "cli",
            "--env.n-train", "8", "--env.n-eval", "2", "--train.steps", "2", "--train.micro-batch", "4",
            "--train.grad-accum", "2", "--train.retention-tokens", "64", "--train.n-samples", "1",
            "--train.eval-max-new-tokens", "4", "--train.max-length", "64", "--probe.every", "1",
            "--probe.batch-sharpness-every", "0", "--probe.max-hvps", "8", "--replay.weight", "0"]
    assert main(args) == 0
    run_dir = tmp_path / "runs" / "cli"
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert json.loads((run_dir / "config.json").read_text())["config"]["train"]["steps"] == 2
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    assert "report:" in capsys.readouterr().out
    phases = json.loads((tmp_path / "report" / "phases.json").read_text())
    assert phases[0]["run"] == "cli" and phases[0]["phase"] == "too-short"  # 2 probes: too few to call a phase

"""bench/learnability.py end to end on the tiny model: every regime runs at the CLI defaults (steps shortened), RL
starts from the warm start's saved policy, and the table reads accuracy, retention and RL reward from the runs."""
import json
from dataclasses import asdict

from experiments.bench.learnability import main, wilson
from conftest import TINY_CORPUS
from experiments.run import default_config


def test_every_regime_runs_and_is_summarised(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    replay = tmp_path / "pretraining.json"  # the tiny model's own corpus stands in for its pre-training text
    replay.write_text(json.dumps(TINY_CORPUS * 20))
    rows = main(["--envs", "ArithRLVR-v0", "--model", str(tiny_model_dir), "--out", str(out), "--n-eval", "4",
                 "--replay-source", str(replay),
                 "--sft-steps", "2", "--lora-steps", "2", "--sgd-lrs", "0.1", "--sgd-steps", "2", "--warm-steps", "2",
                 "--rl-steps", "2", "--rl-base-steps", "2"])
    assert [r["label"] for r in rows] == ["sft", "lora", "sgd lr=0.1", "warm start", "rl", "rl-base"]
    assert all(r["status"] == "completed" and r["n_eval"] == 4 and "acc1" in r and "ppl1" in r for r in rows)
    # training time (the time/step_s rows) is part of the wall time of the run, and probes add to it
    assert all(0 < r["train_seconds"] < r["seconds"] and r["probe_seconds"] >= 0 for r in rows)
    by = {r["label"]: r for r in rows}
    assert "reward0" in by["rl"] and "reward0" in by["rl-base"] and "reward0" not in by["sft"]
    rl_config = json.loads((out / "ArithRLVR-v0" / "rl-from-warm-start" / "config.json").read_text())["config"]
    assert rl_config["model"]["name"].endswith("warm-start-sft/checkpoints/final_model")
    assert rl_config["optim"] == json.loads(json.dumps(asdict(default_config("rl").optim)))  # the CLI's defaults
    sft_config = json.loads((out / "ArithRLVR-v0" / "sft-ArithRLVR-v0-adamw-lr0.001-b64-r0-s0" / "config.json")
                            .read_text())["config"]
    assert sft_config["replay"] == {**asdict(default_config("sft").replay), "source": str(replay)}
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rows))
    assert "sgd lr=0.1" in capsys.readouterr().out


def test_wilson_interval():
    lo, hi = wilson(483, 500)
    assert 0.94 < lo < 0.95 and 0.97 < hi < 0.98  # 0.966: the textbook Wilson bounds 0.945, 0.979
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and 0.27 < wilson(0, 10)[1] < 0.28

"""`eoslab demo` = `eoslab study --scale demo` beside the Cohen validation: its configuration, and a toy-sized demo
end to end on the tiny model (2 spawned workers; the full-size demo is `make demo`)."""

import json
from pathlib import Path

from experiments.demo import DemoConfig, run_demo
from experiments.rundirs import find_runs
from experiments.study import StudyConfig, pairs, resolve


def test_demo_is_the_study_at_demo_scale():
    study = resolve(DemoConfig().study)
    assert study == resolve(StudyConfig(scale="demo", out=Path("runs/demo")))
    # at least one setting that reaches the edge in the demo's 60 steps (GD) beside the user's SGD, in each regime
    assert set(pairs(study)) == {("sft", "gd"), ("sft", "sgd_m0.9"), ("lora_r16", "gd"), ("lora_r16", "sgd_m0.9"),
                                 ("rl", "sgd_m0.9")}
    assert min(study.ratios) < 1 < max(study.ratios) and study.learn_steps == 0


def test_tiny_demo_end_to_end(tiny_model_dir, tmp_path, capsys):
    study = StudyConfig(scale="demo", out=tmp_path / "demo", model=str(tiny_model_dir), workers=2,
                        regimes=("sft", "rl"), optimizers=("gd", "sgd_m0.9"), ratios=(1.0,), steps=3, rl_steps=2,
                        probe_every=1, rl_probe_every=1, probe_set_size=8, gd_n_train=16, n_eval=2,
                        warm_start_steps=2, learn_steps=2)
    index = run_demo(DemoConfig(study=study, cohen_lrs=(0.45,), cohen_steps=40))
    out = capsys.readouterr().out
    assert f"report: {index.resolve()}" in out and "FAILED" not in out
    assert index == tmp_path / "demo" / "report" / "index.html"
    runs = {r.name: r for r in find_runs([tmp_path / "demo"]) if r.path.parent.name != "calibration"}
    # warm start + the learning run + sft × {gd, sgd β=0.9} + rl × sgd β=0.9 (rl × gd skipped) + Cohen
    assert len(runs) == 6 and all(r.status["status"] == "completed" for r in runs.values())
    cohen = [r for r in runs.values() if r.path.parent.name == "cohen2021"]
    assert len(cohen) == 1 and cohen[0].has("probe/lambda_max")
    learner = next(r for r in runs.values() if r.path.parent.name == "rl-learn")
    assert learner.optimizer == "adamw" and not learner.has("probe/lambda_max")
    learning = out.split("learning (held-out")[1]
    assert "warm-start-sft" in learning and learner.name in learning
    assert "EoS phases" in out and "sft-ArithRLVR-v0-sgd" in out.split("EoS phases")[1]
    # the report was written after the Cohen runs finished (run_study's before_report waits for them)
    assert cohen[0].name in {row["run"] for row in json.loads((index.parent / "phases.json").read_text())}
    found = json.loads((index.parent / "findings.json").read_text())
    # the Cohen runs are in the report, but the probe-less warm start and learning run make no findings cell
    assert {a["regime"] for a in found["regimes"]} >= {"sft", "rl"}
    assert not any("adamw" in s["group"] for s in found["statements"])
    assert "does the Edge of Stability persist" in (index.parent / "findings.md").read_text()
    run_demo(DemoConfig(study=study, cohen_lrs=(0.45,), cohen_steps=40))  # a rerun runs nothing new
    assert "[todo]" not in capsys.readouterr().out

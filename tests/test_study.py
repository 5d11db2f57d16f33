"""`eoslab study`: the plan at each scale (pairs, the GD-for-RLVR skip, seeds), the LR grid placed from a given
calibration (η·λ₀/c spans about 0.1 … 3), the calibration cache, config errors before training, and a toy study end
to end on the tiny model that writes the findings page with per-regime answers."""

import json
from pathlib import Path

import pytest

import experiments.study as study
from experiments.cli import parse
from experiments.run import ConfigError, default_config
from experiments.rundirs import find_runs
from experiments.study import (EDGE, OPTIMIZERS, REGIMES, StudyConfig, calibrate, calibration_key, check, pairs,
                               resolve, run_study, skipped, study_sweeps)


def fake_calibration(cfg, value=10.0):
    return {calibration_key(r, o): value for r, o in pairs(resolve(cfg))}


def test_thresholds_per_optimizer():
    assert EDGE == pytest.approx({"gd": 2.0, "sgd": 2.0, "sgd_m0.9": 3.8, "adam": 38.0})


@pytest.mark.parametrize("scale", ["demo", "small", "full"])
def test_plan_at_each_scale(scale):
    cfg = resolve(StudyConfig(scale=scale))
    sweeps = study_sweeps(cfg, fake_calibration(cfg))
    got = set()
    for s in sweeps:
        regime, optimizer = s.name.split("-", 1)
        got.add((regime, optimizer))
        kind, rank = REGIMES[regime]
        for c in s.configs:
            assert (c.regime, c.model.lora_rank) == (kind, rank)
            assert c.train.full_batch == (optimizer == "gd")
            assert {c.train.seed for c in s.configs} == set(cfg.seeds)
        lrs = sorted({c.optim.lr for c in s.configs})
        assert len(lrs) == len(cfg.ratios) and len(s.configs) == len(lrs) * len(cfg.seeds)
    assert got == set(pairs(cfg))
    assert all(o != "gd" for r, o in got if REGIMES[r][0] == "rl")  # no full-batch GD for RLVR
    if scale != "demo":
        # every regime × optimizer pair but GD for the two RLVR regimes, ≥ 3 LRs bracketing the edge, 3 seeds
        assert len(got) == len(REGIMES) * len(OPTIMIZERS) - 2
        assert {(r, o) for r, o, _ in skipped(cfg)} == {("rl", "gd"), ("rl_lora_r16", "gd")}
        assert len(cfg.ratios) >= 3 and min(cfg.ratios) < 1 < max(cfg.ratios) and len(cfg.seeds) >= 3
    assert min(cfg.ratios) >= 0.1 and max(cfg.ratios) <= 3.0
    # full-parameter GD is deterministic: its seeds train on disjoint blocks of the pool (seed 0 on the first)
    gd = [c for s in sweeps if s.name == "sft-gd" for c in s.configs]
    assert gd and all(c.env.offset == c.train.seed * cfg.gd_n_train for c in gd)
    assert all(c.env.offset == 0 for s in sweeps if s.name != "sft-gd" for c in s.configs)
    user = [c for s in sweeps if s.name.endswith("sgd_m0.9") for c in s.configs if c.regime == "sft"]
    assert user and all((c.optim.momentum, c.optim.weight_decay, c.train.micro_batch * c.train.grad_accum)
                        == (0.9, 1e-4, 16) for c in user)


def test_budgets_by_the_cost_model():
    # estimates from measured per-step costs (not a timing of the study): demo ≤ 10 min, small ≤ 3 h here
    assert study.estimate_seconds(StudyConfig(scale="demo")) <= 600
    assert study.estimate_seconds(StudyConfig(scale="small")) <= 3 * 3600


def test_lr_grid_placed_from_the_calibration():
    cfg = resolve(StudyConfig(scale="small"))
    lam = {calibration_key(r, o): 10.0 * (i + 1) for i, (r, o) in enumerate(pairs(cfg))}
    for s in study_sweeps(cfg, lam):
        regime, optimizer = s.name.split("-", 1)
        lam0 = lam[calibration_key(regime, optimizer)]
        r0 = sorted(c.optim.lr * lam0 / EDGE[optimizer] for c in s.configs)
        assert r0[0] == pytest.approx(0.1, rel=1e-2) and r0[-1] == pytest.approx(3.0, rel=1e-2)
        assert any(r < 1 for r in r0) and any(r > 1 for r in r0)
    # the momentum edge is 3.8/η: the user's SGD gets 1.9× the LR of plain SGD at the same λ₀, Adam 19×
    by = {s.name: sorted({c.optim.lr for c in s.configs}) for s in study_sweeps(cfg, fake_calibration(cfg))}
    assert by["sft-sgd_m0.9"][0] == pytest.approx(1.9 * by["sft-sgd"][0])
    assert by["sft-adam"][0] == pytest.approx(19 * by["sft-sgd"][0])
    with pytest.raises(KeyError):
        study_sweeps(cfg, {})


def test_config_errors_before_any_training(tmp_path):
    with pytest.raises(ConfigError, match="unknown.*bogus"):
        check(resolve(StudyConfig(out=tmp_path, regimes=("bogus",))))
    with pytest.raises(ConfigError, match="no regime × optimizer pair"):
        check(resolve(StudyConfig(out=tmp_path, regimes=("rl",), optimizers=("gd",))))
    with pytest.raises(ConfigError, match="not a file|does not exist|path"):  # full scale: the Alpaca JSON
        check(resolve(StudyConfig(scale="full", out=tmp_path, model="embedded",
                                  alpaca_path=str(tmp_path / "missing.json"), regimes=("sft",))))


def test_cli_parses_study():
    cmd = parse(["study", "--scale", "small", "--seeds", "0", "1", "2", "--dry-run"])
    assert isinstance(cmd, StudyConfig) and cmd.scale == "small" and cmd.seeds == (0, 1, 2) and cmd.dry_run


def tiny(tiny_model_dir, tmp_path, **kw):
    base = dict(out=tmp_path / "study", model=str(tiny_model_dir), workers=1, seeds=(0,), ratios=(0.5, 2.0),
                steps=6, rl_steps=3, probe_every=1, rl_probe_every=1, probe_set_size=8, gd_n_train=16,
                batch_sharpness_every=0, n_eval=2, warm_start_steps=2, adam_calibration_steps=2, checkpoint_every=0)
    base.update(kw)
    return resolve(StudyConfig(**base))


def test_fingerprints_survive_added_fields_and_probe_defaults_of_probe_less_runs():
    # a config.json written before a field existed (experiments.run.ADDED_FIELDS) lacks it; the same config written
    # after holds it at its listed value: both are one calibration. Another value is another calibration.
    from dataclasses import asdict

    from experiments.run import ADDED_FIELDS, comparable_config, replace
    cfg = study.resolve(StudyConfig(scale="small"))
    for c in study.calibration_configs(cfg).values():
        new = json.loads(json.dumps(asdict(c)))    # as config.json holds it
        old = json.loads(json.dumps(new))
        for dotted in ADDED_FIELDS:   # the study keeps every added field at its old value, or where it is idle
            section, name = dotted.split(".")
            del old[section][name]
        assert comparable_config(old) == comparable_config(new)
    c = study.calibration_configs(cfg)["rl/sgd"]
    warm = study.warm_start_config(cfg)
    assert warm.probe.every == 0
    assert study.fingerprint(replace(c, probe={"tol": 0.5}), warm) != study.fingerprint(c, warm)
    # the knobs of a probe kind the calibration never runs (critical sharpness) change nothing
    assert c.probe.critical_every == 0
    assert study.fingerprint(replace(c, probe={"critical_chunks": 3}), warm) == study.fingerprint(c, warm)
    assert study.fingerprint(replace(c, out_dir="elsewhere", name="x"), warm) == study.fingerprint(c, warm)
    # the probe-less warm start's probe settings do what probes off does, whatever they are
    assert study.fingerprint(c, replace(warm, probe={"rayleigh_every": 7})) == study.fingerprint(c, warm)
    assert study.fingerprint(c, replace(warm, train={"steps": 151})) != study.fingerprint(c, warm)


def test_calibration_is_cached(tiny_model_dir, tmp_path, monkeypatch):
    cfg = tiny(tiny_model_dir, tmp_path, regimes=("sft",), optimizers=("sgd", "sgd_m0.9", "adam"))
    first = calibrate(cfg, echo=lambda s: None)
    assert set(first) == {"sft/sgd", "sft/adam"} and all(v > 0 for v in first.values())  # β=0 and 0.9 share λ₀
    saved = json.loads((tmp_path / "study" / "calibration.json").read_text())
    assert saved["sft/adam"]["metric"] == "probe/adam_lambda_max" and saved["sft/adam"]["step"] == 2
    assert saved["sft/sgd"]["metric"] == "probe/lambda_max" and saved["sft/sgd"]["step"] == 0

    def no_runs(*a, **k):
        raise AssertionError("a cached calibration ran again")

    monkeypatch.setattr(study, "execute", no_runs)
    assert calibrate(cfg, echo=lambda s: None) == first
    # a changed probe set is another measurement: the cache does not answer for it
    with pytest.raises(AssertionError, match="ran again"):
        calibrate(tiny(tiny_model_dir, tmp_path, regimes=("sft",), optimizers=("sgd",), probe_set_size=12),
                  echo=lambda s: None)
    # ... and measures it again in place of the stale run, which is not passed off as the new measurement
    monkeypatch.undo()
    again = calibrate(tiny(tiny_model_dir, tmp_path, regimes=("sft",), optimizers=("sgd",), probe_set_size=12),
                      echo=lambda s: None)
    assert again["sft/sgd"] > 0 and again["sft/sgd"] != first["sft/sgd"]


def test_tiny_study_end_to_end(tiny_model_dir, tmp_path):
    # 3 pairs (sft × gd, sft × adam, rl × adam; rl × gd skipped), one LR each: ~1 min on a loaded core
    cfg = tiny(tiny_model_dir, tmp_path, regimes=("sft", "rl"), optimizers=("gd", "adam"), ratios=(1.0,), steps=4,
               rl_steps=2, seeds=(0, 1))
    lines = []
    result = run_study(cfg, echo=lines.append)
    index = result.index
    assert not result.failed
    text = "\n".join(lines)
    # seed-major: every pair at seed 0 before any at seed 1, so a study stopped part-way covers every pair
    todo = [Path(line.split("[todo]")[1].split()[0]).name for line in lines
            if "[todo]" in line and "/calibration/" not in line and "warm-start" not in line]
    assert [t[-2:] for t in todo] == ["s0"] * 3 + ["s1"] * 3 and len({t[:-3] for t in todo}) == 3
    assert "FAILED" not in text and "skip rl × gd" in text
    out = tmp_path / "study"
    assert set(json.loads((out / "calibration.json").read_text())) == {"sft/gd", "sft/adam", "rl/adam"}
    runs = {r.path.parent.name: r for r in find_runs([out / "sft-gd", out / "sft-adam", out / "rl-adam"])
            if r.name.endswith("-s0")}
    assert set(runs) == {"sft-gd", "sft-adam", "rl-adam"}
    assert all(r.status["status"] == "completed" for r in runs.values())
    assert runs["rl-adam"].config["model"]["name"].endswith("warm-start-sft/checkpoints/final_model")
    # GD's first probe measures λ₀ again (same set, θ₀): the placed η gives r₀ ≈ 1 (the runs solve at tol 1e-2,
    # the calibration at 1e-3; a looser Krylov solve reads λ a few % low: 35.3 vs 37.6 on the tiny model)
    lam, theta = runs["sft-gd"].series("probe/lambda_max")[1][0], runs["sft-gd"].threshold()[1][0]
    assert lam / theta == pytest.approx(1.0, rel=0.1)
    found = json.loads((index.parent / "findings.json").read_text())
    answers = {a["regime"]: a["answer"] for a in found["regimes"]}
    assert set(answers) == {"sft", "rl"} and set(answers.values()) <= {"yes", "no", "inconclusive"}
    assert {s["group"] for s in found["statements"] if "answer" in s} == {"sft · gd", "sft · adam", "rl · adam"}
    md = (index.parent / "findings.md").read_text()
    assert "Does the Edge of Stability persist" in md and all(f"{r}: does the Edge" in md for r in answers)
    assert all(s["rule"] in md for s in found["statements"])
    assert "[figure](" in md and "[figure]" in index.read_text()
    assert "skipped rl × gd" in md and "sft-gd: sft × gd: λ₀ =" in md  # how each grid was placed
    # rerunning runs nothing: every run is done and the calibration is cached
    lines.clear()
    run_study(cfg, echo=lines.append)
    assert "[todo]" not in "\n".join(lines) and "cached" in "\n".join(lines)


def test_learning_run_is_rl_at_its_defaults_from_the_warm_start():
    cfg = resolve(StudyConfig(scale="small"))
    learn, rl = study.learn_config(cfg), default_config("rl")
    assert (learn.optim, learn.ppo, learn.regime) == (rl.optim, rl.ppo, "rl") and learn.probe.every == 0
    assert learn.model.name == str(study.warm_model(cfg)) and learn.env.env_id == cfg.rl_env_id
    assert learn.train.steps == cfg.learn_steps == 100 and learn.train.eval_every == 25
    assert study.learns(cfg) and not study.learns(resolve(StudyConfig(scale="small", regimes=("sft",))))
    assert not study.learns(resolve(StudyConfig(scale="demo")))  # the demo's 10-minute budget has no room for it
    assert resolve(StudyConfig(scale="small")).out == Path("runs/study/small")
    with pytest.raises(ConfigError, match="learn_steps=-1"):
        check(resolve(StudyConfig(learn_steps=-1)))


def test_regime_answers_follow_their_rule():
    from experiments.findings import regime_answers

    def group(regime, optim, answer):
        return {"group": f"{regime} · {optim}", "regime": regime, "optim": optim, "answer": answer}

    found = [group("sft", "gd", "yes"), group("sft", "adam", "no"), group("rl", "sgd", "no"),
             group("rl", "adam", "no"), group("lora-r4", "sgd", "no"), group("lora-r4", "adam", "inconclusive"),
             {"group": "sft · gd", "statement": "a claim without an answer"}]
    got = {a["regime"]: a for a in regime_answers(found)}
    assert {k: a["answer"] for k, a in got.items()} == {"sft": "yes", "rl": "no", "lora-r4": "inconclusive"}
    assert "holds the edge under gd" in got["sft"]["statement"] and got["sft"]["rule"]


def test_full_batch_runs_are_gd_in_the_findings(tmp_path):
    from experiments.findings import optim_setting
    from experiments.rundirs import Run

    def run(full_batch, momentum=0.0):
        return Run(tmp_path, {"optim": {"name": "sgd", "momentum": momentum}, "train": {"full_batch": full_batch}},
                   {}, {}, [])

    assert [optim_setting(run(True)), optim_setting(run(False)), optim_setting(run(False, 0.9))] == \
        ["gd", "sgd", "sgd β=0.9"]


def test_cli_dry_run_trains_nothing(tmp_path, capsys):
    from experiments.cli import main

    assert main(["study", "--dry-run", "--out", str(tmp_path / "s"), "--regimes", "sft", "rl"]) == 0
    out = capsys.readouterr().out
    assert "skip rl × gd" in out and "calibration: 0/3 cached" in out and "estimated" in out
    assert not (tmp_path / "s").exists()
    assert main(["study", "--regimes", "nope", "--out", str(tmp_path / "s")]) == 2  # one-line config error
    assert "eoslab: error: invalid study config" in capsys.readouterr().err

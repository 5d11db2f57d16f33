"""Sweep machinery on the tiny model: dry run, parallel workers, idempotence, a failing run, declared sweeps."""

import json
import shutil

import pytest

from experiments.run import ConfigError, EnvConfig, ModelConfig, RunConfig, replace
from experiments.sweep import Sweep, available_sweeps, execute, grid, load_sweep, plan, run_sweep
from agents.optim import OptimConfig
from agents.trainer import TrainConfig
from probes import ProbeConfig


def tiny_base(model_dir) -> RunConfig:
    return RunConfig(
        regime="sft",
        model=ModelConfig(name=str(model_dir)),
        env=EnvConfig(env_id="ArithRLVR-v0", n_train=16, n_eval=4),
        optim=OptimConfig(name="sgd", lr=1e-2, momentum=0.9),
        train=TrainConfig(steps=2, micro_batch=4, grad_accum=2, eval_every=0, retention_every=0,
                          retention_tokens=128, checkpoint_every=0, n_samples=2, eval_max_new_tokens=4,
                          max_length=64),
        probe=ProbeConfig(every=1, batch_sharpness_every=0, max_hvps=10),
    )


def test_grid_and_duplicate_names(tiny_model_dir):
    base = tiny_base(tiny_model_dir)
    cfgs = grid(base, lrs=(1e-3, 1e-2), ranks=(0, 4), seeds=(0, 1))
    assert len(cfgs) == 8
    assert {(c.optim.lr, c.model.lora_rank, c.train.seed) for c in cfgs} == {
        (lr, r, s) for lr in (1e-3, 1e-2) for r in (0, 4) for s in (0, 1)}
    assert all(c.optim.momentum == 0.9 for c in cfgs)  # the rest of the base is kept
    with pytest.raises(ValueError, match="share the run name"):
        Sweep("dup", (base, base))


def test_dry_run_then_run_then_idempotent(tiny_model_dir, tmp_path):
    # the parallel (spawned workers) path is exercised by tests/test_demo.py
    sweep = Sweep("tiny", grid(tiny_base(tiny_model_dir), lrs=(1e-3, 1e-2)))
    lines = []
    assert run_sweep(sweep, tmp_path, workers=2, dry_run=True, echo=lines.append) == []
    assert sum("[todo]" in line for line in lines) == 2 and not (tmp_path / "tiny").exists()

    results = run_sweep(sweep, tmp_path, workers=1, echo=lambda s: None)
    assert sorted(r.status for r in results) == ["completed", "completed"], [r.error for r in results]
    for p in plan(sweep, tmp_path):
        assert p.done and p.run_dir.parent == tmp_path / "tiny"
        records = [json.loads(line) for line in (p.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert sum("probe/lambda_max" in r for r in records) == 2  # steps 0 and 1 (probes precede each update)
        cfg = json.loads((p.run_dir / "config.json").read_text())["config"]
        assert cfg["optim"]["lr"] == p.config.optim.lr

    mtimes = {p.run_dir: (p.run_dir / "metrics.jsonl").stat().st_mtime_ns for p in plan(sweep, tmp_path)}
    again = run_sweep(sweep, tmp_path, workers=2, echo=lambda s: None)
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert mtimes == {d: (d / "metrics.jsonl").stat().st_mtime_ns for d in mtimes}
    # the same run names with another config: the finished runs are not passed off as its results
    changed = Sweep("tiny", grid(replace(tiny_base(tiny_model_dir), probe={"every": 2}), lrs=(1e-3, 1e-2)))
    with pytest.raises(ConfigError, match="finished run .* different config: probe.every 1 -> 2"):
        plan(changed, tmp_path)


def test_a_failing_run_is_reported_and_the_others_complete(tiny_model_dir, tmp_path):
    # passes validate (config.json and weight headers are fine) but cannot load: its tokenizer is corrupt
    not_a_model = tmp_path / "broken_tokenizer_model"
    shutil.copytree(tiny_model_dir, not_a_model)
    (not_a_model / "tokenizer.json").write_text("{")
    good = tiny_base(tiny_model_dir)
    bad = replace(good, model={"name": str(not_a_model)}, name="broken")
    results = {r.run_dir.name: r for r in execute(plan(Sweep("mixed", (bad, good)), tmp_path), workers=1,
                                                  echo=lambda s: None)}
    assert results["broken"].status == "error" and results["broken"].error
    assert [r.status for n, r in results.items() if n != "broken"] == ["completed"]


def test_declared_sweeps_are_valid(tmp_path):
    names = available_sweeps()
    assert {"sft_lr", "lora_rank_lr", "rl_lr"} <= set(names)
    for name in names:
        planned = plan(load_sweep(name), tmp_path)  # validates every config
        assert all(p.run_dir.parent == tmp_path / name and not p.done for p in planned)
    lrs = sorted({p.config.optim.lr for p in plan(load_sweep("sft_lr"), tmp_path)})
    assert lrs[0] == 1e-4 and lrs[-1] == 1e-2
    sft = plan(load_sweep("sft_lr"), tmp_path)[0].config
    assert (sft.optim.momentum, sft.optim.weight_decay, sft.train.micro_batch * sft.train.grad_accum) == (0.9, 1e-4, 16)
    assert {p.config.model.lora_rank for p in plan(load_sweep("lora_rank_lr"), tmp_path)} == {2, 8, 32}
    rl = plan(load_sweep("rl_lr"), tmp_path)
    assert rl[0].prerequisite and rl[0].config.regime == "sft"  # the SFT warm start runs first
    assert {p.config.regime for p in rl[1:]} == {"rl"}
    assert {p.config.model.name for p in rl[1:]} == {str(rl[0].run_dir / "checkpoints" / "final_model")}
    with pytest.raises(KeyError, match="available"):
        load_sweep("nope")


def test_only_keeps_the_matching_runs_and_the_warm_start_they_need(tmp_path):
    sweep = load_sweep("adaptive_lr")
    sft = sweep.only(["sft-*"])
    assert sft.name == sweep.name and sft.warm_start is None   # no SFT run starts from the RLVR warm start
    assert len(sft.configs) == 21 and {c.regime for c in sft.configs} == {"sft"}
    both = sweep.only(["sft-const-*", "rl-eos0.9-lr*-s0"])
    assert {c.name for c in both.configs} == {f"sft-const-lr{lr:g}-s{s}" for lr in (3e-4, 1e-3, 3e-3)
                                              for s in (0, 1, 2)} | {"rl-eos0.9-lr0.0001-s0"}
    assert both.warm_start is sweep.warm_start                  # the RLVR run needs it
    # the same run dirs as the whole sweep's
    whole = {p.config.name: p.run_dir for p in plan(sweep, tmp_path)}
    assert all(whole[p.config.name] == p.run_dir for p in plan(both, tmp_path) if not p.prerequisite)
    assert sweep.only([]) is sweep
    with pytest.raises(ValueError, match=r"no run name matches \['sft-cosnie-\*'\]"):
        sweep.only(["sft-*", "sft-cosnie-*"])

import dataclasses
import json
import math
import shutil
import time

import pytest
import torch

from agents.optim import OptimConfig
from agents.ppo import PPOConfig
from agents.trainer import FINAL_MODEL, LINEAGE_FILE, TrainConfig, read_metrics
from experiments.run import (ConfigError, EnvConfig, ModelConfig, RunConfig, _retention_texts, config_changes,
                             replace, retention_source, run, run_name, validate)
from probes import ProbeConfig

from conftest import DEVICES


def tiny_cfg(model_dir, out_dir, **sections) -> RunConfig:
    base = RunConfig(
        model=ModelConfig(name=str(model_dir)),
        env=EnvConfig(n_train=8, n_eval=2),
        optim=OptimConfig(name="sgd", lr=0.05),
        train=TrainConfig(steps=2, micro_batch=2, grad_accum=2, eval_every=0, retention_every=0, retention_tokens=0,
                          checkpoint_every=1, eval_max_new_tokens=4, n_samples=2),
        ppo=PPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=4),
        probe=ProbeConfig(every=0),
        out_dir=str(out_dir),
    )
    return replace(base, **sections)


def test_default_config_is_valid_and_named():
    validate(RunConfig())  # must not build or load the embedded model
    assert run_name(RunConfig()) == "sft-ArithRLVR-v0-sgd-lr0.01-b16-r0-s0"
    assert run_name(replace(RunConfig(), regime="rl", model={"lora_rank": 8})) == \
        "rl-ArithRLVR-v0-sgd-lr0.01-p8x4-r8-s0"


@pytest.mark.parametrize("sections, fragment", [
    ({"optim": {"lr": -1.0}}, "optim.lr"),
    ({"optim": {"name": "rmsprop"}}, "optim.name"),
    ({"env": {"env_id": "Nope-v0"}}, "env.env_id"),
    ({"env": {"env_id": "AlpacaSFT-v0", "n_train": 100}}, "exceeds"),
    ({"model": {"lora_rank": -2}}, "lora_rank"),
    ({"model": {"name": "/no/such/dir"}}, "model.name"),
    ({"model": {"dtype": "int8"}}, "model.dtype"),
    ({"model": {"device": "gpu0"}}, "model.device"),
    ({"regime": "dpo"}, "regime"),
    ({"train": {"full_batch": True, "micro_batch": 3}}, "divisible"),
    ({"regime": "rl", "train": {"full_batch": True}}, "full_batch"),
    ({"regime": "rl", "ppo": {"group_size": 1}}, "group_size"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"name": "a/b"}, "name"),
    ({"env": {"kwargs": {"max_digit": 3}}}, r"\['max_digit'\] not accepted by ArithRLVR-v0 \(accepted: .*max_digits"),
    ({"env": {"kwargs": {"split": "test"}}}, "not accepted"),
    ({"env": {"kwargs": {"max_digits": 12}}}, "max_digits"),
    ({"env": {"env_id": "AlpacaSFT-v0", "kwargs": {"path": "/no/such/alpaca.json"}}}, "not found"),
    ({"regime": "rl", "env": {"env_id": "InstructRLVR-v0"}, "ppo": {"curriculum_window": 8}}, "difficulty levels"),
    ({"regime": "rl", "ppo": {"curriculum_window": 8, "curriculum_start": 6}}, "curriculum_start=6 must be < 6"),
])
def test_validate_reports_each_config_error(tmp_path, sections, fragment):
    cfg = tiny_cfg(tmp_path, tmp_path, **sections)
    with pytest.raises(ConfigError, match=fragment):
        validate(cfg)
    with pytest.raises(ConfigError, match=fragment):
        run(cfg)  # fails before anything is written
    assert not (tmp_path / run_name(cfg)).exists() if "/" not in str(cfg.name) else True


def test_validate_lists_all_errors_at_once(tmp_path):
    cfg = tiny_cfg(tmp_path, tmp_path, optim={"lr": 0.0, "name": "x"}, model={"lora_rank": -1})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert all(s in str(e.value) for s in ("optim.lr", "optim.name", "lora_rank"))


def test_sft_run_writes_the_run_dir_and_skips_when_done(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tmp_path, train={"retention_tokens": 256})
    run_dir = run(cfg, progress=False)
    assert run_dir == tmp_path / run_name(cfg)
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["config"]["optim"]["lr"] == 0.05 and meta["resumed"] == [] and len(meta["git_hash"]) >= 7
    assert isinstance(meta["argv"], list)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["retention/perplexity"] > 1 and "retention/loss" in rows[2]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert (run_dir / "samples.json").exists()
    stamp = (run_dir / "metrics.jsonl").stat().st_mtime_ns
    time.sleep(0.01)
    assert run(cfg, progress=False) == run_dir  # DONE: skipped
    assert (run_dir / "metrics.jsonl").stat().st_mtime_ns == stamp


def test_resume_with_changed_lr_is_recorded_and_used(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tmp_path, name="r", train={"steps": 2})
    run_dir = run(cfg, progress=False)
    (run_dir / "DONE").unlink()  # pretend it stopped at step 2
    longer = replace(cfg, optim={"lr": 0.02}, train={"steps": 4, "grad_accum": 1})
    run(longer, progress=False)
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["config"]["optim"]["lr"] == 0.02
    assert meta["resumed"][-1]["from_step"] == 2
    assert meta["resumed"][-1]["changes"] == {"optim.lr": [0.05, 0.02], "train.steps": [2, 4],
                                              "train.grad_accum": [2, 1]}
    lrs = {r["step"]: r["train/lr"] for r in read_metrics(run_dir) if "train/lr" in r}
    assert lrs == {0: 0.05, 1: 0.05, 2: 0.02, 3: 0.02}
    ckpt = json.loads((run_dir / "checkpoints" / "step_4" / "state.json").read_text())
    assert ckpt["regime"]["cursor"] == 2 * 4 + 2 * 2  # two steps of 4 examples, then two of 2
    (run_dir / "DONE").unlink()
    with pytest.raises(ConfigError, match="train.seed"):
        run(replace(longer, train={"seed": 1, "steps": 5}), progress=False)


def test_rl_lora_run_from_an_sft_run_logs_rl_and_probe_metrics(tiny_model_dir, tmp_path):
    sft_dir = run(tiny_cfg(tiny_model_dir, tmp_path, name="sft", train={"steps": 1}), progress=False)
    cfg = tiny_cfg(tiny_model_dir, tmp_path, regime="rl", model={"lora_rank": 2, "name": str(sft_dir / FINAL_MODEL)},
                   probe=ProbeConfig(every=1, batch_sharpness_every=0, max_hvps=4))
    rl_dir = run(cfg, progress=False)
    rows = read_metrics(rl_dir)
    sft_final = [r["final"] for r in json.loads((sft_dir / "samples.json").read_text())["rows"]]
    rl_base = [r["base"] for r in json.loads((rl_dir / "samples.json").read_text())["rows"]]
    base = [r["base"] for r in json.loads((sft_dir / "samples.json").read_text())["rows"]]
    assert rl_base == sft_final and sft_final != base  # RL starts where SFT ended
    step0 = rows[0]
    for key in ("env/reward_mean", "env/accuracy", "rl/kl", "rl/clip_frac", "rl/entropy", "rl/response_len",
                "train/loss", "probe/lambda_max", "eval/accuracy"):
        assert key in step0, key
    assert step0["rl/clip_frac"] == 0.0 and step0["rl/kl"] == pytest.approx(0.0, abs=1e-6)


def test_value_head_run_resumes_bitwise(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_cfg(tiny_model_dir, tmp_path, regime="rl", ppo={"advantage": "value"},
                   optim={"name": "adam", "lr": 0.01}, train={"steps": 2, "retention_tokens": 0})
    straight = run(replace(cfg, name="a"), progress=False)
    run(replace(cfg, name="b", train={"steps": 1}), progress=False)
    (tmp_path / "b" / "DONE").unlink()
    resumed = run(replace(cfg, name="b"), progress=False)
    a = load_file(str(straight / "checkpoints" / "step_2" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_2" / "model.safetensors"))
    assert {"regime.value_head.weight", "regime.value_head.bias"} <= set(a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt = torch.load(resumed / "checkpoints" / "step_2" / "optimizer.pt", weights_only=False)["optimizer"]
    assert len(opt["param_groups"]) == 2  # policy + value head, one optimizer


def test_rl_curriculum_run_logs_its_level_and_resumes_bitwise(tiny_model_dir, tmp_path):
    """`eoslab rl --ppo.curriculum-window N`: rollouts from the env's difficulty ladder, the level in the metrics, and
    the curriculum's state in the checkpoints (a resumed run equals the straight one, level and all)."""
    cfg = tiny_cfg(tiny_model_dir, tmp_path, regime="rl", ppo={"curriculum_window": 2, "curriculum_start": 1},
                   train={"steps": 3, "retention_tokens": 0})
    straight = run(replace(cfg, name="a"), progress=False)
    run(replace(cfg, name="b", train={"steps": 2}), progress=False)
    (tmp_path / "b" / "DONE").unlink()
    resumed = run(replace(cfg, name="b"), progress=False)
    rows = [r for r in read_metrics(straight, wall_clock=False) if "train/loss" in r]
    assert [r["curriculum/level_played"] for r in rows][0] == 1.0 and all("curriculum/level" in r for r in rows)
    assert rows == [r for r in read_metrics(resumed, wall_clock=False) if "train/loss" in r]
    state = json.loads((resumed / "checkpoints" / "step_3" / "state.json").read_text())["regime"]
    assert state["curriculum"]["config"]["window"] == 2 and len(state["level_cursors"]) == 6


def test_wandb_logs_offline_into_the_run_dir(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = run(tiny_cfg(tiny_model_dir, tmp_path, wandb=True, train={"steps": 1}), progress=False)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_config_changes_flattens_sections():
    a, b = RunConfig(), replace(RunConfig(), optim={"lr": 0.5}, probe=ProbeConfig(every=3))
    from dataclasses import asdict

    assert config_changes(asdict(a), asdict(b)) == {"optim.lr": [0.01, 0.5], "probe.every": [500, 3]}
    # a run dir written before probe.chunk_size existed did what chunk_size=0 does: no change; another value is one
    old = asdict(a)
    del old["probe"]["chunk_size"]
    assert config_changes(old, asdict(a)) == {}
    assert config_changes(old, asdict(replace(a, probe={"chunk_size": 4}))) == {"probe.chunk_size": [0, 4]}
    # before critical_chunks and batch_lambda_max, critical sharpness read the whole probe set and every probe step
    # solved the batch too: a new run at the new defaults (1 chunk, no batch solve) is another config
    del old["probe"]["critical_chunks"], old["probe"]["batch_lambda_max"]
    assert config_changes(old, asdict(replace(a, probe={"critical_chunks": 0, "batch_lambda_max": True}))) == {}
    assert config_changes(old, asdict(a)) == {"probe.critical_chunks": [0, 1], "probe.batch_lambda_max": [True, False]}
    # probe.cache_mb bounds memory and changes no number (tests/test_probes_hvp.py): never a change, whatever it was
    old = asdict(a)
    del old["probe"]["cache_mb"]
    assert config_changes(old, asdict(a)) == {} == config_changes(asdict(a), asdict(replace(a, probe={"cache_mb": 7})))
    from experiments.run import comparable_config as _comparable
    assert _comparable(old) == _comparable(asdict(replace(a, probe={"cache_mb": 7})))
    # with probes off in both, no other probe field changes what the run does; with probes on in one, they do
    off = replace(a, probe={"every": 0})
    assert config_changes(asdict(off), asdict(replace(off, probe={"rayleigh_every": 7, "tol": 0.5}))) == {}
    assert config_changes(asdict(off), asdict(replace(a, probe={"every": 3, "tol": 0.5}))) == {
        "probe.every": [0, 3], "probe.tol": [0.001, 0.5]}
    # a probe kind that runs in neither: its knobs change nothing; where it runs in one, they count
    quiet = replace(a, probe={"critical_every": 0})
    assert config_changes(asdict(quiet), asdict(replace(quiet, probe={"critical_rtol": 0.3, "critical_chunks": 2}))) \
        == {}
    assert config_changes(asdict(quiet), asdict(replace(a, probe={"critical_rtol": 0.3}))) == {
        "probe.critical_every": [0, 10], "probe.critical_rtol": [0.15, 0.3]}
    from experiments.run import comparable_config
    assert "probe.critical_rtol" not in comparable_config(asdict(quiet)) and "probe.tol" in comparable_config(
        asdict(quiet))
    # a knob read by two kinds (block_patterns: per-block traces and per-block λ_max) counts while either runs
    traced = replace(a, probe={"trace_every": 5, "blocks_every": 0})
    assert "probe.block_patterns" in comparable_config(asdict(traced))
    assert "probe.block_patterns" not in comparable_config(asdict(replace(traced, probe={"trace_every": 0})))


def test_warm_started_runs_are_scored_on_the_base_models_retention_texts(tiny_model_dir, tmp_path):
    """SFT -> SFT -> RL chain: every run measures forgetting on the original model's held-out texts, so a run's
    step-0 retention perplexity equals its parent's final one (same weights, same texts)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    held = ["The held-out prose of the base model, never trained on.", "def add(a, b):\n    return a + b\n"]
    (base / "retention.json").write_text(json.dumps(held))
    measure = {"retention_tokens": 256, "steps": 1}
    first = run(tiny_cfg(base, tmp_path, name="sft1", train=measure), progress=False)
    second = run(tiny_cfg(first / FINAL_MODEL, tmp_path, name="sft2", train=measure), progress=False)
    third = run(tiny_cfg(second / FINAL_MODEL, tmp_path, name="rl3", regime="rl", train=measure), progress=False)
    lineage = json.loads((second / FINAL_MODEL / LINEAGE_FILE).read_text())
    assert lineage["base_model"] == str((first / FINAL_MODEL).resolve())
    assert lineage["retention_source"] == str(base.resolve()) and lineage["regime"] == "sft"
    for d in (first, second, third):
        assert retention_source(str(d / FINAL_MODEL)) == str(base.resolve())
    assert _retention_texts(retention_source(str(third / FINAL_MODEL))) == tuple(held)
    rows = [read_metrics(d) for d in (first, second, third)]
    for parent, child in zip(rows, rows[1:]):
        assert child[0]["retention/perplexity"] == pytest.approx(parent[-1]["retention/perplexity"], rel=1e-5)
    # Lineage files without a resolved source are followed through base_model; cycles are an error.
    hop = tmp_path / "hop"
    hop.mkdir()
    (hop / LINEAGE_FILE).write_text(json.dumps({"base_model": str(second / FINAL_MODEL)}))
    assert retention_source(str(hop)) == str(base.resolve())
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / LINEAGE_FILE).write_text(json.dumps({"base_model": str(loop)}))
    with pytest.raises(ConfigError, match="cycle"):
        retention_source(str(loop))
    assert retention_source("embedded") == "embedded"
    (second / FINAL_MODEL / LINEAGE_FILE).unlink()  # a run saved before lineage files: its config.json is read
    assert retention_source(str(second / FINAL_MODEL)) == str(base)


def test_env_kwargs_reach_every_env_of_the_run(tiny_model_dir, tmp_path):
    """AlpacaSFT-v0 on a local file: train/eval tasks come from it, the kwargs are in config.json and the name."""
    words = ["apple", "river", "stone", "cloud", "lamp", "bird", "tree", "road", "fish", "moon"] * 4
    data = [{"instruction": f"Repeat the word {w} ({i}).", "input": "", "output": w} for i, w in enumerate(words)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(data))
    cfg = tiny_cfg(tiny_model_dir, tmp_path, env={"env_id": "AlpacaSFT-v0", "n_train": 8, "n_eval": 2,
                                                  "kwargs": {"path": str(path)}})
    assert run_name(cfg) != run_name(replace(cfg, env={"kwargs": {}})) and "-k" in run_name(cfg)
    run_dir = run(cfg, progress=False)
    assert json.loads((run_dir / "config.json").read_text())["config"]["env"]["kwargs"] == {"path": str(path)}
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["train/loss"] > 0 for r in rows[:2])
    prompts = [r["prompt"] for r in json.loads((run_dir / "samples.json").read_text())["rows"]]
    assert prompts and all("Repeat the word" in p for p in prompts)
    assert 0.0 <= rows[-1]["eval/accuracy"] <= 1.0


def test_rl_trains_on_problems_that_sft_never_saw():
    """Default SFT and RL runs draw from disjoint pools of the train split (whatever n_train), the pools together
    are the train split, and neither touches a test problem."""
    import envs
    from experiments.run import train_tasks

    env = envs.make_unwrapped("ArithRLVR-v0")
    sft, rl = train_tasks(env, EnvConfig(), "sft"), train_tasks(env, EnvConfig(), "rl")
    key = env.split_key  # the same for a problem and its twins (3+1 for 1+3): they never straddle two pools
    assert len(sft) + len(rl) == len(env.tasks("train"))
    assert not {key(t) for t in sft} & {key(t) for t in rl}
    assert not ({key(t) for t in sft} | {key(t) for t in rl}) & {key(t) for t in env.tasks("test")}
    assert 0.15 < len(rl) / (len(sft) + len(rl)) < 0.25  # RL_POOL_SHARE = 0.2
    # n_train takes a prefix of the pool; "all" is the whole split in dataset order
    assert train_tasks(env, EnvConfig(n_train=100), "rl") == rl[:100]
    assert train_tasks(env, EnvConfig(pool="all"), "rl") == env.tasks("train")
    with pytest.raises(ValueError, match="exceeds"):
        train_tasks(env, EnvConfig(n_train=len(rl) + 1), "rl")
    # offset: disjoint blocks of the pool (a deterministic full-batch run's seeds train on different data)
    assert train_tasks(env, EnvConfig(n_train=100, offset=100), "rl") == rl[100:200]
    assert train_tasks(env, EnvConfig(offset=len(rl) - 3), "rl") == rl[-3:]
    with pytest.raises(ValueError, match="after env.offset=10"):
        train_tasks(env, EnvConfig(n_train=len(rl) - 9, offset=10), "rl")


def test_validating_many_configs_of_one_env_draws_its_pool_once(monkeypatch):
    """A sweep validates every config before it runs: the pool size is drawn once per (env, kwargs, pool) and the
    n_train check answers from it, with the same errors."""
    from envs.config import config_errors
    from envs.core import TextTaskEnv

    e = EnvConfig(env_id="ArithRLVR-v0", kwargs={"max_digits": 2})
    assert config_errors(e, "sft")[0] == []
    size = len(train_tasks_of(e, "sft"))

    def no_draws(self, *a, **k):
        raise AssertionError("the pool was drawn again")

    monkeypatch.setattr(TextTaskEnv, "tasks", no_draws)
    assert config_errors(dataclasses.replace(e, n_train=size), "sft")[0] == []
    errors = config_errors(dataclasses.replace(e, n_train=size + 1), "sft")[0]
    assert errors == [f"env.n_train={size + 1} exceeds the {size} tasks of ArithRLVR-v0's train split in pool 'sft'"]
    # another pool is another draw (the env's own errors come back as config errors)
    assert "drawn again" in " ".join(config_errors(dataclasses.replace(e, pool="rl"), "sft")[0])


def train_tasks_of(e, regime):
    import envs
    from experiments.run import train_tasks

    return train_tasks(envs.make_unwrapped(e.env_id, **e.kwargs), e, regime)


def test_a_fused_head_run_trains_and_probes_as_the_plain_one(tiny_model_dir, tmp_path):
    # model.head_chunk: the same SFT losses and λ_max to float rounding (agents.fused_head), through the whole run
    probe = {"every": 1, "probe_set_size": 4, "critical_every": 1, "rayleigh_every": 0, "alignment_every": 0}
    a = run(tiny_cfg(tiny_model_dir, tmp_path, name="plain", probe=probe), progress=False)
    b = run(tiny_cfg(tiny_model_dir, tmp_path, name="fused", probe=probe, model={"head_chunk": 8}), progress=False)
    ra, rb = (read_metrics(d, wall_clock=False) for d in (a, b))
    for key in ("train/loss", "probe/lambda_max", "probe/critical_sharpness"):
        xa, xb = [r[key] for r in ra if key in r], [r[key] for r in rb if key in r]
        assert len(xa) == len(xb) >= 1 and all(math.isclose(x, y, rel_tol=1e-4) for x, y in zip(xa, xb)), key
    assert json.loads((b / "config.json").read_text())["config"]["model"]["head_chunk"] == 8
    with pytest.raises(ConfigError, match="model.head_chunk=-1"):
        validate(tiny_cfg(tiny_model_dir, tmp_path, model={"head_chunk": -1}))


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_attention_trains_and_probes_what_eager_does(tiny_model_dir, tmp_path, device):
    from experiments.run import _policy

    # "auto" is eager off CUDA (every earlier run), sdpa on it; the choice reaches the loaded model
    assert _policy(ModelConfig(name=str(tiny_model_dir), device=device), False).model.config._attn_implementation \
        == ("sdpa" if device.startswith("cuda") else "eager")
    assert _policy(ModelConfig(name=str(tiny_model_dir), device=device, attention="sdpa"),
                   False).model.config._attn_implementation == "sdpa"
    # SDPA's fused kernels have no double backward: every probe below takes its HVPs through the math kernel
    probe = {"every": 1, "probe_set_size": 4, "critical_every": 1, "rayleigh_every": 1, "alignment_every": 1}
    runs = {a: run(tiny_cfg(tiny_model_dir, tmp_path, name=a, probe=probe, model={"attention": a, "device": device}),
                   progress=False)
            for a in ("eager", "sdpa")}
    rows = {a: read_metrics(d, wall_clock=False) for a, d in runs.items()}
    for key in ("train/loss", "probe/lambda_max", "probe/update_sharpness", "probe/critical_sharpness"):
        xa, xb = ([r[key] for r in rows[a] if key in r] for a in ("eager", "sdpa"))
        assert len(xa) == len(xb) >= 1 and all(math.isclose(x, y, rel_tol=1e-4) for x, y in zip(xa, xb)), key
    assert json.loads((runs["sdpa"] / "config.json").read_text())["config"]["model"]["attention"] == "sdpa"
    with pytest.raises(ConfigError, match="model.attention='flash_attention_2'"):
        validate(tiny_cfg(tiny_model_dir, tmp_path, model={"attention": "flash_attention_2"}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("half", ["bfloat16", "float16"])
def test_half_autocast_trains_the_half_loss_and_probes_the_float32_one(tiny_model_dir, tmp_path, half, device):
    import warnings

    probe = {"every": 1, "probe_set_size": 4, "critical_every": 0, "rayleigh_every": 0, "alignment_every": 0}
    model = {"device": device}
    a = run(tiny_cfg(tiny_model_dir, tmp_path, name="fp32", probe=probe, model=model), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # a probe of bf16 weights would warn: none here
        b = run(tiny_cfg(tiny_model_dir, tmp_path, name=half, probe=probe, model=model, train={"autocast": half}),
                progress=False)
    ra, rb = (read_metrics(d, wall_clock=False) for d in (a, b))
    la, lb = ([r["train/loss"] for r in rows if "train/loss" in r] for rows in (ra, rb))
    # the training loss is computed in half precision (close, not equal) ...
    assert la[0] != lb[0] and all(math.isclose(x, y, rel_tol=0.05) for x, y in zip(la, lb))
    # ... while the step-0 probe, at the same float32 weights, is the float32 one: bit for bit on the CPU (CUDA's
    # atomic-add backward kernels sum in no fixed order)
    pa, pb = ([r["probe/lambda_max"] for r in rows if "probe/lambda_max" in r] for rows in (ra, rb))
    assert pa[0] == pb[0] if device == "cpu" else math.isclose(pa[0], pb[0], rel_tol=1e-5)
    if half == "float16":   # loss-scaled: at the default scale no step of this run overflowed
        assert [r["train/overflow"] for r in rb if "train/loss" in r] == [0.0, 0.0]
        assert all(r["train/loss_scale"] == 2.0 ** 16 for r in rb if "train/loss" in r)
    with pytest.raises(ConfigError, match="train.autocast='float8'"):
        validate(tiny_cfg(tiny_model_dir, tmp_path, train={"autocast": "float8"}))

import json
import math
import sys
import time

import pytest
import torch

import envs
from agents.optim import OptimConfig, build_optimizer, build_scheduler
from agents.policy import LMPolicy
from agents.ppo import PPOConfig, PPORegime
from agents.sft import SFTRegime
from agents.trainer import Trainer, TrainConfig, checkpoint_dirs, read_metrics
from probes import ProbeConfig, Prober


def digit_fraction(completions, answers):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


@pytest.fixture(scope="module")
def data():
    return envs.load_tasks("ArithRLVR-v0", "train", 16), envs.load_tasks("ArithRLVR-v0", "test", 3)


def make_trainer(model_dir, run_dir, data, *, steps, regime="sft", optim=OptimConfig(name="adam", lr=3e-3),
                 prober=None, **train_kw):
    train_tasks, eval_tasks = data
    policy = LMPolicy.from_pretrained(model_dir)
    cfg = TrainConfig(**{"steps": steps, "micro_batch": 2, "grad_accum": 2, "eval_every": 0, "retention_every": 0,
                         "checkpoint_every": 3, "eval_max_new_tokens": 4, "n_samples": 2, **train_kw})
    if regime == "sft":
        reg = SFTRegime(train_tasks, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum, seed=cfg.seed)
        score = lambda c, a: envs.score_batch("ArithRLVR-v0", c, a)  # noqa: E731
    else:
        ppo = PPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, ppo_epochs=2, kl_coef=0.1)
        reg = PPORegime(policy, train_tasks, digit_fraction, ppo, micro_batch=2, seed=cfg.seed)
        score = digit_fraction
    opt = build_optimizer(policy.trainable_parameters().values(), optim)
    sched = build_scheduler(opt, optim, steps)
    return Trainer(policy, reg, opt, cfg, run_dir, scheduler=sched, prober=prober, eval_tasks=eval_tasks,
                   score_fn=score, progress=False)


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.policy.trainable_parameters().items()}


def _losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


@pytest.mark.parametrize("regime, optim", [
    ("sft", OptimConfig(name="adam", lr=3e-3)),
    ("rl", OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True)),  # resumes mid-buffer (ppo_epochs=2)
])
def test_resume_continues_the_same_trajectory_bitwise(tiny_model_dir, tmp_path, data, regime, optim):
    straight = make_trainer(tiny_model_dir, tmp_path / "a", data, steps=6, regime=regime, optim=optim)
    assert straight.train() == "completed"
    first = make_trainer(tiny_model_dir, tmp_path / "b", data, steps=3, regime=regime, optim=optim)
    first.train()
    torch.manual_seed(12345)  # scramble the global RNG: the checkpoint must restore it
    resumed = make_trainer(tiny_model_dir, tmp_path / "b", data, steps=6, regime=regime, optim=optim)
    assert resumed.train() == "completed"
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 6
    steps = [r["step"] for r in read_metrics(tmp_path / "b")]
    assert steps == sorted(steps) and steps.count(3) == 1  # the stopped run's final row was replaced
    assert torch.equal(torch.get_rng_state(), straight_rng(tmp_path / "a"))
    assert [s for s, _ in checkpoint_dirs(tmp_path / "b")] == [3, 6]
    status = json.loads((tmp_path / "b" / "status.json").read_text())
    assert status["status"] == "completed" and status["step"] == 6
    assert (tmp_path / "b" / "DONE").read_text() == (tmp_path / "b" / "status.json").read_text()


def straight_rng(run_dir):
    return torch.load(run_dir / "checkpoints" / "step_6" / "rng.pt", weights_only=False)["torch"]


@pytest.mark.parametrize("regime", ["sft", "rl"])
def test_resume_with_probes_on_is_bitwise_identical(tiny_model_dir, tmp_path, data, regime):
    """Twin of test_resume_continues_the_same_trajectory_bitwise with probes on: warm starts and the last update
    Δθ are checkpointed, so every probe value after a resume is the uninterrupted run's (timings aside)."""

    def prober():
        return Prober(ProbeConfig(every=1, batch_sharpness_every=2, batch_min_samples=2, batch_max_samples=2,
                                  max_hvps=6))

    make_trainer(tiny_model_dir, tmp_path / "a", data, steps=6, regime=regime, prober=prober()).train()
    make_trainer(tiny_model_dir, tmp_path / "b", data, steps=3, regime=regime, prober=prober()).train()
    torch.manual_seed(12345)
    make_trainer(tiny_model_dir, tmp_path / "b", data, steps=6, regime=regime, prober=prober()).train()
    a, b = (read_metrics(tmp_path / d, wall_clock=False) for d in "ab")
    assert [r["step"] for r in b] == list(range(7))
    assert "probe/update_sharpness" in b[3] and "probe/batch_sharpness" in b[4]
    assert a == b


@pytest.mark.parametrize("regime", ["sft", "rl"])
def test_probes_on_and_off_train_bitwise_identically(tiny_model_dir, tmp_path, data, regime):
    off = make_trainer(tiny_model_dir, tmp_path / "off", data, steps=4, checkpoint_every=0, regime=regime)
    off.train()
    prober = Prober(ProbeConfig(every=1, batch_sharpness_every=2, batch_min_samples=2, batch_max_samples=2,
                                max_hvps=6, batch_lambda_max=True))
    on = make_trainer(tiny_model_dir, tmp_path / "on", data, steps=4, checkpoint_every=0, prober=prober,
                      regime=regime)
    on.train()
    a, b = _params(off), _params(on)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "off") == _losses(tmp_path / "on")
    rows = [r for r in read_metrics(tmp_path / "on") if "probe/lambda_max" in r]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(math.isfinite(r["probe/lambda_max"]) for r in rows)
    assert "probe/batch_sharpness" in rows[2] and "probe/update_sharpness" in rows[1]
    # the default probe set (64 ≥ 16 tasks) is the whole training set; the 4-example batch has its own λ_max
    assert all(r["probe/lambda_max_batch"] != r["probe/lambda_max"] for r in rows) or regime == "rl"
    assert regime == "sft" or all(r["probe/lambda_max_batch"] == r["probe/lambda_max"] for r in rows)


def test_update_passed_to_probes_is_the_last_step(tiny_model_dir, tmp_path, data):
    seen = {}

    class Recorder:  # a prober that records what the trainer hands it
        def due(self, step):
            return True

        def __call__(self, ctx):
            seen[ctx.step] = (ctx.update, {k: v.detach().clone() for k, v in ctx.params.items()},
                              sum(float(ctx.loss_fn(c).detach()) for c in ctx.batches))
            return {}

    t = make_trainer(tiny_model_dir, tmp_path, data, steps=3, checkpoint_every=0, prober=Recorder())
    t.train()
    assert seen[0][0] is None
    for s in (1, 2):
        update, now, loss = seen[s]
        before = seen[s - 1][1]
        assert all(torch.equal(update[k], now[k] - before[k]) for k in now)
    assert _losses(tmp_path)[1] == pytest.approx(seen[1][2], rel=1e-6)  # probes see the loss that is stepped on


def test_a_probe_call_sees_one_saved_copy_of_the_state_and_no_gradients(tiny_model_dir, tmp_path, data):
    """What is resident when a probe starts, beyond the weights: Adam's two moments, the last update (which the
    probe reads) and ONE saved copy of the last good state (weights, moments and its own last update), kept for a
    divergence; no gradients. Counted as distinct storages of the largest weight's shape that are not parameters:
    7 per such weight from step 2 on. Taking θ_step's copy before the probe beside θ_{step-1}'s, and keeping the
    last step's gradients and pre-update weights alive, made it 13 (at the 70M scale, +1.7 GB of the probe call's
    entry level)."""
    import gc

    counts, grads = {}, {}
    gc.collect()
    # tensors that earlier tests left alive in this process are not the trainer's: held (so that no new tensor can
    # take their memory) and left out of the count
    earlier = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    old = {o.untyped_storage().data_ptr() for o in earlier}

    class Counter:  # a prober that counts the copies of the largest weight alive when it is called
        def due(self, step):
            return True

        def __call__(self, ctx):
            shape = max((p.shape for p in ctx.params.values()), key=lambda s: s.numel())
            gc.collect()   # count what is reachable, not garbage awaiting the collector
            storages = {o.untyped_storage().data_ptr() for o in gc.get_objects()
                        if isinstance(o, torch.Tensor) and not o.requires_grad and o.shape == shape} - old
            counts[ctx.step] = (len(storages), sum(p.shape == shape for p in ctx.params.values()))
            grads[ctx.step] = [k for k, p in ctx.params.items() if p.grad is not None]
            return {}

    make_trainer(tiny_model_dir, tmp_path, data, steps=4, checkpoint_every=0, prober=Counter()).train()
    assert all(not g for g in grads.values()), grads
    assert counts[0][0] == 0    # step 0: nothing but the weights (no earlier state, no moments, no update)
    n, m = counts[1]
    assert n == 4 * m           # step 1: the moments, the update and θ_0's saved weights (θ_0 had no moments)
    for step in (2, 3):
        n, m = counts[step]
        assert n == 7 * m, (step, n, m)


def test_probes_get_the_regimes_fixed_probe_set_at_every_step(tiny_model_dir, tmp_path, data):
    seen = []

    class Recorder:  # a prober that records what the trainer hands it
        config = ProbeConfig(probe_set_size=5, seed=2)

        def due(self, step):
            return True

        def __call__(self, ctx):
            seen.append((ctx.probe_set, ctx.batches))
            return {}

    t = make_trainer(tiny_model_dir, tmp_path, data, steps=3, checkpoint_every=0, prober=Recorder())
    t.train()
    expected = t.regime.probe_set(t.policy, 5, seed=2)
    assert all(p is expected for p, _ in seen) and sum(len(c["input_ids"]) for c in expected) == 5
    assert not any(torch.equal(seen[0][1][0]["input_ids"], b[0]["input_ids"]) for _, b in seen[1:])  # batches move


def _fp16(trainer, init_scale):
    """``trainer`` with float16's loss scaler started at ``init_scale`` (2^16 by default; 2^20 overflows here)."""
    trainer.scaler = torch.amp.GradScaler(trainer.policy.device.type, init_scale=init_scale)
    return trainer


def test_float16_skips_overflowing_steps_and_resumes_its_loss_scale_bitwise(tiny_model_dir, tmp_path, data):
    straight = _fp16(make_trainer(tiny_model_dir, tmp_path / "a", data, steps=6, autocast="float16"), 2.0 ** 20)
    assert straight.train() == "completed"
    rows = [r for r in read_metrics(tmp_path / "a", wall_clock=False) if "train/loss" in r]
    # at 2^20 the scaled float16 gradient overflows: 3 steps skipped, halving the scale, then it holds
    assert [r["train/overflow"] for r in rows] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert [r["train/loss_scale"] for r in rows] == [2.0 ** e for e in (20, 19, 18, 17, 17, 17)]
    assert all(math.isfinite(r["train/loss"]) and r["train/grad_norm"] is None for r in rows[:3])   # inf: null
    assert {int(st["step"]) for st in straight.optimizer.state.values()} == {3}   # Adam stepped 3 times, not 6
    # the scale is checkpointed: a resume at step 3 does not start again from 2^20 (3 more skipped steps)
    _fp16(make_trainer(tiny_model_dir, tmp_path / "b", data, steps=3, autocast="float16"), 2.0 ** 20).train()
    resumed = _fp16(make_trainer(tiny_model_dir, tmp_path / "b", data, steps=6, autocast="float16"), 2.0 ** 20)
    assert resumed.train() == "completed"
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(tmp_path / "a", wall_clock=False) == read_metrics(tmp_path / "b", wall_clock=False)


def test_float16_gradient_that_overflows_at_unit_scale_ends_the_run_as_diverged(tiny_model_dir, tmp_path, data):
    t = _fp16(make_trainer(tiny_model_dir, tmp_path, data, steps=6, autocast="float16", checkpoint_every=1), 4.0)
    w = next(iter(t.policy.trainable_parameters().values())).reshape(-1)[0]
    loss_fn = t._loss_fn

    def nan_gradient(chunk):   # the loss is unchanged (+0), its gradient NaN (√ at 0): no scale can help
        loss, stats = loss_fn(chunk)
        return loss + 0.0 * (w - w).abs().sqrt(), stats
    t._loss_fn = nan_gradient
    assert t.train() == "diverged"
    rows = [r for r in read_metrics(tmp_path, wall_clock=False) if "train/loss" in r]
    assert [(r["train/loss_scale"], r["train/overflow"]) for r in rows] == [(4.0, 1.0), (2.0, 1.0), (1.0, 0.0)]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["step"] == 2 and "float16 gradient overflows at loss scale 1" in status["reason"]


def test_divergence_ends_cleanly_and_keeps_good_checkpoints(tiny_model_dir, tmp_path, data):
    sgd = OptimConfig(name="sgd", lr=30.0, momentum=0.9, weight_decay=0.0)
    t = make_trainer(tiny_model_dir, tmp_path, data, steps=30, checkpoint_every=1, divergence_loss=8.0, optim=sgd)
    assert t.train() == "diverged"
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "diverged" and "train/loss" in status["reason"]
    assert (tmp_path / "DONE").exists()
    rows = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    last = rows[-1]
    assert last["step"] == status["step"] and (last["train/loss"] is None or last["train/loss"] > 8.0)
    assert all(r["train/loss"] is not None and r["train/loss"] <= 8.0 for r in rows[:-1])
    ckpts = checkpoint_dirs(tmp_path)
    assert ckpts and ckpts[-1][0] == status["step"]  # θ at the diverging step; nothing after it
    fresh = make_trainer(tiny_model_dir, tmp_path / "x", data, steps=30, optim=sgd)
    assert fresh.load_checkpoint(ckpts[-1][1]) == status["step"]
    assert all(torch.isfinite(p).all() for p in fresh.policy.trainable_parameters().values())


def test_samples_and_metrics_files(tiny_model_dir, tmp_path, data):
    t = make_trainer(tiny_model_dir, tmp_path, data, steps=2, checkpoint_every=0)
    def slow_retention(pol):
        time.sleep(0.5)
        return {"retention/perplexity": 7.0, "retention/loss": math.log(7.0)}

    t.retention_fn = slow_retention
    t.train()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    # the wall clock splits into training (time/step_s) and measurement (time/measure_s): retention is measured at
    # steps 0 and 2 (the end), and its half second never enters the training time
    assert [r["time/measure_s"] >= 0.5 for r in rows] == [True, False, True]
    assert all(0 < r["time/step_s"] < 0.5 for r in rows[:2]) and "time/step_s" not in rows[2]
    # the step's memory peak above its entry (probes.memory, checked against known allocations there); no probes ran
    if sys.platform.startswith("linux"):
        assert all(r["memory/step_mb"] >= 0 for r in rows[:2]) and "memory/probe_mb" not in rows[0]
        assert all(r["memory/step_peak_mb"] >= r["memory/step_mb"] for r in rows[:2])
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/accuracy", "retention/perplexity"} <= set(rows[0])
    assert "train/loss" not in rows[2] and "eval/accuracy" in rows[2]
    assert rows[0]["train/lr"] == pytest.approx(3e-3)
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert samples["base_step"] == 0 and samples["final_step"] == 2 and len(samples["rows"]) == 2
    for r in samples["rows"]:
        assert {"prompt", "answer", "base", "final", "base_correct", "final_correct"} <= set(r)
        assert r["final_correct"] == (envs.score_batch("ArithRLVR-v0", [r["final"]], [r["answer"]])[0] >= 1)

"""The EoS learning-rate controller and the CDAT baseline (agents.eos_lr): the rule against hand-computed values on
quadratics, its safeguards, the estimators against dense eigenvalues, the Cohen MLP "must hold" (η·λ/θ within ±10%
of ρ after warm-up; no divergence for ρ ≤ 1), and a bitwise resume through the trainer."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from agents.eos_lr import (CdatController, ControlConfig, CriticalEstimate, Estimate, EosController, WarmRayleigh,
                           build_controller, control_errors, controller_tag, threshold_constant, update_direction)
from agents.optim import OptimConfig, build_optimizer, build_scheduler, config_errors
from probes import ProbeContext


# ---- a quadratic L(θ) = ½ θᵀAθ with a known spectrum --------------------------------------------------------
def quadratic(eigs=(10.0, 4.0, 1.0, 0.5, 0.25, 0.1, 0.05), seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
    theta = torch.nn.Parameter(torch.randn(len(eigs), generator=gen, dtype=torch.float64))
    return a, theta, (lambda chunk: 0.5 * theta @ a @ theta)


def context(theta, loss_fn, opt, step=0):
    return ProbeContext(params={"theta": theta}, loss_fn=loss_fn, batches=[None], lr=opt.param_groups[0]["lr"],
                        step=step, optimizer=opt)


def backward(theta, loss_fn, opt):
    opt.zero_grad()
    loss = loss_fn(None)
    loss.backward()
    return float(loss.detach())


class FixedEstimate:
    """An estimator that returns given values (safeguard tests need no Hessian)."""

    def __init__(self, *values):
        self.values = list(values)

    def __call__(self, ctx, generator):
        return Estimate(self.values.pop(0), 1, 1)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def sgd(lr=0.1, momentum=0.0, **kw):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, momentum=momentum, **kw)


# ---- the rule and its safeguards -----------------------------------------------------------------------------
def test_threshold_constant_comes_from_probes_thresholds():
    assert threshold_constant(sgd()) == pytest.approx(2.0)
    assert threshold_constant(sgd(momentum=0.9)) == pytest.approx(3.8)
    assert threshold_constant(sgd(momentum=0.9, nesterov=True)) == pytest.approx(3.8 / 2.8)
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, betas=(0.9, 0.999))
    assert threshold_constant(adam) == pytest.approx(38.0)


def test_rule_hits_the_target_and_bounds_each_change():
    ctl = EosController(sgd(lr=0.1), ControlConfig(target=0.8, max_change=1.5), estimator=FixedEstimate())
    # λ̂ = 18: r = 0.1·18/2 = 0.9, target 0.8 -> η = 0.1·0.8/0.9 (within the ±1.5× bound)
    assert ctl.propose(18.0) == pytest.approx(0.1 * 0.8 / 0.9, rel=1e-12)
    assert ctl.propose(1000.0) == pytest.approx(0.1 / 1.5)   # wants η/62: bounded to η/m
    assert ctl.propose(0.01) == pytest.approx(0.1 * 1.5)     # wants η·1600: bounded to η·m
    # heavy ball: r = ηλ̂/(2 + 2β)
    mom = EosController(sgd(lr=0.1, momentum=0.9), ControlConfig(target=1.0), estimator=FixedEstimate())
    assert mom.propose(38.0) == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -3.0, 0.0])
def test_unusable_estimate_leaves_lr_unchanged(bad):
    opt = sgd(lr=0.1)
    ctl = EosController(opt, ControlConfig(every=1), estimator=FixedEstimate(bad))
    assert ctl.propose(bad) == 0.1
    row = ctl(ProbeContext(params={}, loss_fn=None, batches=[], lr=0.1, step=0, optimizer=opt), 1.0)
    assert row["optim/lr"] == 0.1 and opt.param_groups[0]["lr"] == 0.1


def test_spike_backs_off_and_non_finite_loss_counts_as_spike():
    opt = sgd(lr=0.2)
    ctl = EosController(opt, ControlConfig(spike=2.0, backoff=0.5, loss_ema=0.5), estimator=FixedEstimate())
    assert not any(ctl.observe_loss(x) for x in (1.0, 1.2, 0.9, 1.5))   # EMA 1.0 -> 1.1 -> 1.0 -> 1.25
    assert ctl.observe_loss(2.6)                                           # > 2 × 1.25
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and ctl.lr == pytest.approx(0.1)
    assert not ctl.observe_loss(2.6)   # the spike entered the EMA (1.925): a new level, not a new spike
    assert ctl.observe_loss(math.nan) and ctl.lr == pytest.approx(0.05)
    assert math.isfinite(ctl.loss_ema)   # a NaN loss never enters the EMA
    off = EosController(sgd(lr=0.2), ControlConfig(spike=0.0), estimator=FixedEstimate())
    assert not any(off.observe_loss(x) for x in (1.0, 100.0, math.inf))
    neg = EosController(sgd(lr=0.2), ControlConfig(), estimator=FixedEstimate())  # PPO surrogate: EMA ≤ 0
    assert not any(neg.observe_loss(x) for x in (-0.1, -0.05, 0.3))


def test_lr_is_only_set_every_k_steps_and_keeps_group_ratios():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [q], "lr": 0.05}], lr=0.1)
    ctl = EosController(opt, ControlConfig(every=3, target=1.0), estimator=FixedEstimate(10.0, 40.0))
    ctx = ProbeContext(params={}, loss_fn=None, batches=[], lr=0.1, step=0, optimizer=opt)
    lrs = []
    for step in range(6):
        ctx.step = step
        row = ctl(ctx, 1.0)
        lrs.append(row["optim/lr"])
        assert row["optim/est_hvps"] == (1.0 if step % 3 == 0 else 0.0)
    # step 0: λ̂ = 10 -> η = 2/10 = 0.2 (r = 0.5, ×2 bounded to ×1.5 = 0.15); step 3: λ̂ = 40 at η = 0.15 -> 0.05 -> 0.1
    assert lrs == pytest.approx([0.15] * 3 + [0.1] * 3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.05])   # group 1 keeps half of group 0


def test_config_errors_are_clear():
    assert control_errors(ControlConfig()) == []
    bad = ControlConfig(target=math.nan, every=0, max_change=1.0, estimator="magic", hvps=0, spike=0.5, backoff=1.0,
                        cdat_ema=1.0)
    text = "; ".join(control_errors(bad))
    for field in ("target", "every", "max_change", "estimator", "hvps", "spike", "backoff", "cdat_ema"):
        assert f"optim.control.{field}" in text
    assert config_errors(OptimConfig(schedule="eos")) == []
    assert any("warmup_steps" in e for e in config_errors(OptimConfig(schedule="eos", warmup_steps=10)))
    assert any("optim.control.target" in e for e in config_errors(
        OptimConfig(schedule="cdat", control=ControlConfig(target=-1.0))))
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(schedule="eos"))
    assert build_scheduler(opt, OptimConfig(schedule="eos"), 10) is None
    assert build_controller(opt, "cosine", ControlConfig()) is None
    assert isinstance(build_controller(opt, "eos", ControlConfig()), EosController)
    assert isinstance(build_controller(opt, "cdat", ControlConfig()), CdatController)


def test_noise_term_has_its_norm_is_reproducible_and_leaves_the_global_rng_alone():
    theta = torch.nn.Parameter(torch.zeros(20000, dtype=torch.float64))
    g = torch.randn(20000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    opt = torch.optim.SGD([theta], lr=0.1)

    def noisy(step, noise):
        theta.grad = g.clone()
        ctl = EosController(opt, ControlConfig(every=100, noise=noise), estimator=FixedEstimate())
        rng = torch.get_rng_state()
        row = ctl(ProbeContext(params={"theta": theta}, loss_fn=None, batches=[], lr=0.1, step=step,
                               optimizer=opt), 1.0)
        assert torch.equal(torch.get_rng_state(), rng)
        return theta.grad - g, row

    zeta, row = noisy(1, 0.1)
    assert float(zeta.norm()) == pytest.approx(row["optim/noise_norm"], rel=1e-9)
    assert float(zeta.norm()) == pytest.approx(0.1 * float(g.norm()), rel=0.02)   # ‖ζ‖ ≈ noise·‖g‖ (d = 20000)
    assert abs(float(zeta @ g)) < 0.05 * float(zeta.norm() * g.norm())           # isotropic: unrelated to g
    again, _ = noisy(1, 0.1)
    other, _ = noisy(2, 0.1)
    assert torch.equal(zeta, again) and not torch.equal(zeta, other)           # a function of (seed, step)
    off, row = noisy(1, 0.0)
    assert torch.equal(off, torch.zeros_like(off)) and "optim/noise_norm" not in row
    assert any("noise" in e for e in control_errors(ControlConfig(noise=-1.0)))


# ---- estimators against dense eigenvalues ------------------------------------------------------------------
def test_warm_rayleigh_finds_lambda_max_cold_and_stays_on_it_warm():
    a, theta, loss_fn = quadratic()
    opt = torch.optim.SGD([theta], lr=0.1)
    est = WarmRayleigh(hvps=1, cold_hvps=30, tol=1e-8)
    cold = est(context(theta, loss_fn, opt), torch.Generator().manual_seed(0))
    assert cold.value == pytest.approx(10.0, rel=1e-6) and cold.hvps <= 30 and cold.grads == 1
    v = est.warm.clone()
    warm = est(context(theta, loss_fn, opt), torch.Generator().manual_seed(1))
    assert warm.hvps == 1 and warm.value == pytest.approx(float(v @ a @ v), rel=1e-12)   # vᵀAv of the warm v


def test_warm_rayleigh_under_adam_measures_the_preconditioned_sharpness():
    a, theta, loss_fn = quadratic()
    opt = torch.optim.Adam([theta], lr=0.01, betas=(0.9, 0.999))
    est = WarmRayleigh(hvps=1, cold_hvps=30, tol=1e-9)
    assert math.isnan(est(context(theta, loss_fn, opt), torch.Generator()).value)   # no Adam state yet
    for _ in range(3):
        backward(theta, loss_fn, opt)
        opt.step()
    st = opt.state[theta]
    t = float(st["step"])
    p = (1 - 0.9 ** t) * ((st["exp_avg_sq"] / (1 - 0.999 ** t)).sqrt() + 1e-8)
    s = p.rsqrt()
    dense = torch.linalg.eigvalsh(s[:, None] * a * s[None, :]).max()
    value = est(context(theta, loss_fn, opt), torch.Generator().manual_seed(0)).value
    assert value == pytest.approx(float(dense), rel=1e-6)


def test_controller_on_a_quadratic_puts_eta_at_rho_over_the_edge():
    _, theta, loss_fn = quadratic()
    opt = torch.optim.SGD([theta], lr=0.15)
    ctl = build_controller(opt, "eos", ControlConfig(target=0.8, tol=1e-10, cold_hvps=40))
    loss = backward(theta, loss_fn, opt)
    row = ctl(context(theta, loss_fn, opt), loss)
    assert opt.param_groups[0]["lr"] == pytest.approx(2 * 0.8 / 10.0, rel=1e-8)   # η·λ_max/2 = ρ exactly
    assert row["optim/ratio_est"] == pytest.approx(0.8, rel=1e-8) and row["optim/sharpness_est"] == pytest.approx(10)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_critical_estimate_is_the_curvature_along_the_step_about_to_be_taken(momentum):
    """On a quadratic, f(s) − f(0) = sη gᵀu + ½s²η² uᵀAu along Δθ = s·η·u, so λc = 2/(s_c η) = uᵀAu/(−gᵀu): for GD
    (u = −g) the gradient's Rayleigh quotient gᵀAg/gᵀg; with momentum u = −(βm + g). Warm at an unchanged θ it
    costs 3 forward passes; nothing is changed (θ, .grad, optimizer state)."""
    a, theta, loss_fn = quadratic()
    opt = torch.optim.SGD([theta], lr=0.01, momentum=momentum)
    for _ in range(3):   # a momentum buffer that is not the gradient
        backward(theta, loss_fn, opt)
        opt.step()
    backward(theta, loss_fn, opt)
    g = theta.grad.detach().clone()
    u = -(momentum * opt.state[theta]["momentum_buffer"] + g) if momentum else -g
    truth = float(u @ a @ u) / float(-(g @ u))
    assert truth > 0 and torch.allclose(u, -g) == (momentum == 0)   # descent; with momentum not along −g
    before = theta.detach().clone()
    est = CriticalEstimate(rtol=0.01)
    cold = est(context(theta, loss_fn, opt), torch.Generator())
    # s_c = 2/(ηλc) ≈ 23: f(0), f(1), 5 doublings, 6 bisections to rtol 0.01 = 13 passes
    assert cold.value == pytest.approx(truth, rel=0.01) and cold.hvps == 0 and 4 <= cold.forwards <= 14
    # GD: ≤ λ_max (up to the bracket's width); with momentum −gᵀu can be small, so λc can exceed λ_max (here ~4×)
    assert (cold.value <= 10.0 * (1 + 0.01)) == (momentum == 0)
    warm = est(context(theta, loss_fn, opt), torch.Generator())
    warm_eta = est.eta
    assert warm.forwards == 3 and warm.value == pytest.approx(cold.value, rel=0.02)
    assert torch.equal(theta.detach(), before) and torch.equal(theta.grad, g)
    assert CriticalEstimate.threshold(opt) == 2.0   # one-step edge for every optimizer
    # a step that is not a descent direction (the momentum buffer points uphill) has no ηc: NaN, η left alone
    opt.state[theta]["momentum_buffer"] = -100.0 * g   # u = −(βm + g) = 89 g
    if momentum:
        assert math.isnan(est(context(theta, loss_fn, opt), torch.Generator()).value) and est.eta == warm_eta


def test_controller_with_critical_sharpness_takes_rho_of_the_critical_step():
    a, theta, loss_fn = quadratic()
    opt = torch.optim.SGD([theta], lr=0.15, momentum=0.9)
    ctl = build_controller(opt, "eos", ControlConfig(target=0.8, estimator="critical", critical_rtol=0.01))
    assert ctl.threshold_constant() == 2.0 and threshold_constant(opt) == pytest.approx(3.8)
    loss = backward(theta, loss_fn, opt)
    g = theta.grad.detach().clone()
    row = ctl(context(theta, loss_fn, opt), loss)
    lam_c = float(g @ a @ g) / float(g @ g)   # first step: empty momentum buffer, u = −g
    assert ctl.lr == pytest.approx(2 * 0.8 / lam_c, rel=0.02)   # 0.8 of the step that would raise the loss
    assert row["optim/ratio_est"] == pytest.approx(0.8, rel=1e-9) and row["optim/est_forwards"] > 0
    assert row["optim/est_hvps"] == 0 and row["optim/sharpness_est"] == pytest.approx(lam_c, rel=0.01)
    assert controller_tag("eos", ctl.cfg) == "-eos0.8-critical" and controller_tag("eos", ControlConfig()) == "-eos0.9"


# ---- CDAT ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw"])
def test_update_direction_is_the_step_per_unit_lr_and_restores_everything(name):
    _, theta, loss_fn = quadratic()
    make = {"sgd": lambda: torch.optim.SGD([theta], lr=0.1, weight_decay=0.01),
            "momentum": lambda: torch.optim.SGD([theta], lr=0.1, momentum=0.9, nesterov=True),
            "adam": lambda: torch.optim.Adam([theta], lr=0.01),
            "adamw": lambda: torch.optim.AdamW([theta], lr=0.01, weight_decay=0.1)}[name]
    opt = make()
    for _ in range(2):   # some optimizer state (momentum buffer, Adam moments)
        backward(theta, loss_fn, opt)
        opt.step()
    backward(theta, loss_fn, opt)
    before, state = theta.detach().clone(), {k: v.clone() for k, v in opt.state[theta].items()}
    u = update_direction(opt, {"theta": theta})
    assert torch.equal(theta.detach(), before) and opt.param_groups[0]["lr"] in (0.1, 0.01)
    assert all(torch.equal(opt.state[theta][k], v) for k, v in state.items())
    opt.step()   # the real step: Δθ = η·u
    lr = opt.param_groups[0]["lr"]
    torch.testing.assert_close(theta.detach() - before, lr * u, rtol=1e-10, atol=1e-14)


def test_cdat_on_gd_is_sigma_over_the_gradient_rayleigh_quotient():
    a, theta, loss_fn = quadratic()
    opt = torch.optim.SGD([theta], lr=0.05)
    ctl = build_controller(opt, "cdat", ControlConfig(cdat_scale=2.0, cdat_ema=0.5, every=1))
    loss = backward(theta, loss_fn, opt)
    g = (a @ theta).detach()
    row = ctl(context(theta, loss_fn, opt), loss)
    n1, d1 = float(g @ g), float(g @ a @ g)   # u = −g
    assert ctl.lr == pytest.approx(2 * n1 / d1, rel=1e-10) and row["optim/est_hvps"] == 1
    assert row["optim/sharpness_est"] == pytest.approx(d1 / n1, rel=1e-10)
    opt.step()
    loss = backward(theta, loss_fn, opt)
    g = (a @ theta).detach()
    ctl(context(theta, loss_fn, opt, step=1), loss)
    n2, d2 = float(g @ g), float(g @ a @ g)
    assert ctl.lr == pytest.approx(2 * (0.5 * n1 + 0.5 * n2) / (0.5 * d1 + 0.5 * d2), rel=1e-10)   # EMAs


# ---- the Cohen MLP (full-batch GD): the "must hold" -------------------------------------------------------------
@pytest.fixture(scope="module")
def cohen_runs(tmp_path_factory):
    from experiments.cohen2021 import CohenConfig, run_cohen
    from experiments.rundirs import load_run

    root = tmp_path_factory.mktemp("eos_cohen")
    return {rho: load_run(run_cohen(CohenConfig(lr=0.3, steps=250, eig_every=10, eig_tol=1e-6, out_dir=str(root),
                                                schedule="eos", control=ControlConfig(target=rho, every=5))))
            for rho in (0.5, 0.8, 1.0)}


WARMUP = 50   # steps: from η = 0.3 the bounded (×1.5) updates reach ρ by step ~10; the margin covers the overshoot


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_cohen_mlp_ratio_held_within_ten_percent_of_rho(cohen_runs, rho):
    run = cohen_runs[rho]
    steps, lam = run.series("probe/lambda_max")     # converged λ_max at θ_t (tol 1e-6), not the controller's λ̂
    _, two_over_eta = run.series("probe/two_over_eta")   # 2/η at the η of step t
    ratio = lam / two_over_eta
    late = ratio[steps >= WARMUP]
    assert len(late) >= 20
    assert np.all(np.abs(late / rho - 1) <= 0.10), late
    _, lr = run.series("train/lr")
    assert np.all(np.isfinite(lr)) and np.all(lr > 0)
    assert len(np.unique(lr)) > 10   # the controller really moves η (progressive sharpening pushes it down)


@pytest.mark.parametrize("rho", [0.5, 0.8, 1.0])
def test_cohen_mlp_never_diverges_for_rho_up_to_one(cohen_runs, rho):
    run = cohen_runs[rho]
    assert run.status["status"] == "completed"
    _, loss = run.series("train/loss")
    assert np.all(np.isfinite(loss)) and loss[-1] < 0.25 * loss[0]
    s, hvps = run.series("optim/est_hvps")
    assert hvps[0] > 0 and np.all(hvps[s % 5 != 0] == 0) and np.all(hvps[(s % 5 == 0) & (s > 0)] <= 3)


@pytest.mark.parametrize("rho", [0.5, 1.0])
def test_cohen_mlp_under_critical_sharpness_control_trains_above_the_lambda_max_edge(tmp_path, rho):
    """Along the gradient λc = gᵀHg/gᵀg ≤ λ_max, so taking ρ of the critical step puts η above ρ·2/λ_max. Measured
    (250 steps from η 0.3, every 5): η·λ_max/2 after step 50 read 0.6–2.2 at ρ 0.5 and 1.3–1.5 at ρ 1.0, i.e. GD
    at and beyond the classical edge, where the loss still fell from 0.52 to 0.02–0.04 without diverging."""
    from experiments.cohen2021 import CohenConfig, run_cohen
    from experiments.rundirs import load_run

    run = load_run(run_cohen(CohenConfig(lr=0.3, steps=250, eig_every=10, eig_tol=1e-6, out_dir=str(tmp_path),
                                         schedule="eos", control=ControlConfig(target=rho, every=5,
                                                                               estimator="critical"))))
    assert run.status["status"] == "completed" and run.name.endswith(f"-eos{rho:g}-critical-lr0.3-s0")
    _, loss = run.series("train/loss")
    assert np.all(np.isfinite(loss)) and loss[-1] < 0.25 * loss[0]
    steps, lam = run.series("probe/lambda_max")
    ratio = (lam / run.series("probe/two_over_eta")[1])[steps >= WARMUP]
    assert np.median(ratio) > rho   # above ρ of the λ_max edge: the critical step is the longer one
    s, fw = run.series("optim/est_forwards")
    assert np.all(fw[s % 5 != 0] == 0) and np.all(fw[s % 5 == 0] >= 3) and not np.any(run.series("optim/est_hvps")[1])


# ---- through the trainer: SFT (Adam, eos) and RLVR (momentum SGD, cdat); resume is bitwise ------------------------
def _trainer(model_dir, run_dir, regime, optim, steps, lora_rank=0):
    import envs
    from agents.policy import LMPolicy, LoRASpec
    from agents.ppo import PPOConfig, PPORegime
    from agents.sft import SFTRegime
    from agents.trainer import Trainer, TrainConfig

    train_tasks, eval_tasks = envs.load_tasks("ArithRLVR-v0", "train", 16), envs.load_tasks("ArithRLVR-v0", "test", 2)
    lora = LoRASpec(rank=lora_rank, alpha=2 * lora_rank) if lora_rank else None
    torch.manual_seed(0)   # LoRA's A init draws from the global RNG (experiments.run seeds it the same way)
    policy = LMPolicy.from_pretrained(model_dir, **({"lora": lora} if lora else {}))
    cfg = TrainConfig(steps=steps, micro_batch=2, grad_accum=2, eval_every=0, retention_every=0, checkpoint_every=3,
                      eval_max_new_tokens=4, n_samples=1)
    if regime == "sft":
        reg = SFTRegime(train_tasks, micro_batch=2, grad_accum=2, seed=0)
    else:
        ppo = PPOConfig(prompts_per_step=2, group_size=2, max_new_tokens=4, ppo_epochs=2, kl_coef=0.1)
        reg = PPORegime(policy, train_tasks, lambda c, a: [sum(ch.isdigit() for ch in x) / max(1, len(x)) for x in c],
                        ppo, micro_batch=2, seed=0)
    opt = build_optimizer(policy.trainable_parameters().values(), optim)
    return Trainer(policy, reg, opt, cfg, run_dir, scheduler=build_scheduler(opt, optim, steps),
                   eval_tasks=eval_tasks, score_fn=lambda c, a: envs.score_batch("ArithRLVR-v0", c, a),
                   progress=False, controller=build_controller(opt, optim.schedule, optim.control))


CASES = [  # every=2: estimates at steps 0, 2, 4, so the resumed run (from step 3) needs the checkpointed warm vector
    ("sft", 0, OptimConfig(name="adam", lr=3e-3, schedule="eos", control=ControlConfig(every=2, hvps=2, cold_hvps=4))),
    ("sft", 4, OptimConfig(name="sgd", lr=0.05, momentum=0.9, schedule="eos",   # with the SDE noise term on
                           control=ControlConfig(every=2, hvps=2, cold_hvps=4, noise=0.05))),
    ("rl", 0, OptimConfig(name="sgd", lr=0.05, momentum=0.9, schedule="cdat", control=ControlConfig(every=2))),
    ("sft", 0, OptimConfig(name="sgd", lr=0.05, momentum=0.9, schedule="eos",   # warm from the checkpointed ηc
                           control=ControlConfig(every=2, estimator="critical"))),
]


@pytest.mark.parametrize("regime, lora_rank, optim", CASES,
                         ids=["sft-adam-eos", "lora-momentum-eos", "rl-cdat", "sft-momentum-critical"])
def test_trainer_with_controller_logs_lr_and_resumes_bitwise(tiny_model_dir, tmp_path, regime, lora_rank, optim):
    from agents.trainer import checkpoint_dirs, read_metrics

    straight = _trainer(tiny_model_dir, tmp_path / "a", regime, optim, 6, lora_rank)
    assert straight.train() == "completed"
    _trainer(tiny_model_dir, tmp_path / "b", regime, optim, 3, lora_rank).train()
    resumed = _trainer(tiny_model_dir, tmp_path / "b", regime, optim, 6, lora_rank)
    torch.manual_seed(12345)   # scramble the global RNG: the checkpoint must restore it
    assert resumed.train() == "completed"
    a, b = (dict(t.policy.trainable_parameters()) for t in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)

    def rows(run_dir):  # value for value, wall-clock keys aside
        return read_metrics(run_dir, wall_clock=False)

    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert (checkpoint_dirs(tmp_path / "b")[0][1] / "controller.pt").exists()
    train_rows = [r for r in rows(tmp_path / "a") if "train/loss" in r]
    lrs = [r["optim/lr"] for r in train_rows]
    assert all(r["train/lr"] == r["optim/lr"] for r in train_rows) and len(set(lrs)) > 1
    assert all(math.isfinite(x) and x > 0 for x in lrs)
    # Adam has no preconditioner before its first step: the step-0 estimate is retried at step 1
    expected = [s in ((1, 2, 4) if optim.name == "adam" else (0, 2, 4)) for s in range(6)]
    assert [r["optim/est_hvps"] + r["optim/est_forwards"] > 0 for r in train_rows] == expected
    assert all(math.isfinite(r["optim/sharpness_est"]) for r in train_rows[1:])
    assert all((r.get("optim/noise_norm", 0) > 0) == (optim.control.noise > 0) for r in train_rows)


def test_cli_and_run_config_reach_the_controller():
    from experiments.cli import main, parse
    from experiments.run import run_name, validate

    cfg = parse(["sft", "--optim.schedule", "eos", "--optim.warmup-steps", "0", "--optim.control.target", "0.8",
                 "--optim.control.every", "5"])
    assert cfg.optim.schedule == "eos" and cfg.optim.control.target == 0.8 and cfg.optim.control.every == 5
    validate(cfg)
    assert "-adamw-eos0.8-lr" in run_name(cfg)
    assert "-cdat2-" in run_name(parse(["rl", "--optim.schedule", "cdat"]))
    assert main(["sft", "--optim.schedule", "eos"]) == 2   # the sft default has 50 warm-up steps: a config error
    cohen = parse(["cohen", "--schedule", "eos", "--control.target", "0.5"])
    assert cohen.schedule == "eos" and cohen.control.target == 0.5


def test_adaptive_lr_sweep_is_defined_and_valid(tmp_path):
    from experiments.cohen2021 import config_errors as cohen_errors
    from experiments.run import replace, validate
    from experiments.sweep import load_sweep
    from experiments.sweeps.adaptive_lr import SEEDS, cohen_configs

    sweep = load_sweep("adaptive_lr")   # Sweep() checks that run names are distinct
    assert len(SEEDS) >= 3 and len(sweep.configs) == 3 * 7 * len(SEEDS)
    for cfg in sweep.configs:
        if cfg.optim.schedule in ("eos", "cdat") and cfg.train.seed == 0:   # validating all 63 takes minutes
            if cfg.model.name == "warm-start":   # its model exists once the warm start ran (as experiments.sweep does)
                cfg = replace(cfg, model={"name": "embedded"})
            validate(dataclasses.replace(cfg, out_dir=str(tmp_path)))
    assert sweep.warm_start is not None and sweep.warm_start.regime == "sft"
    schedules = {(c.regime, c.model.lora_rank, c.optim.schedule) for c in sweep.configs}
    assert {s for _, _, s in schedules} == {"constant", "cosine", "eos", "cdat"}
    assert {(r, k > 0) for r, k, _ in schedules} == {("sft", False), ("sft", True), ("rl", False)}
    estimators = {(c.regime, c.model.lora_rank, c.optim.control.estimator) for c in sweep.configs
                  if c.optim.schedule == "eos"}
    assert {e for *_, e in estimators} == {"rayleigh", "critical"} and len(estimators) == 6
    cohen = cohen_configs(str(tmp_path))
    assert {c.schedule for cfgs in cohen.values() for c in cfgs} == {"constant", "cosine", "eos", "cdat"}
    assert {c.control.estimator for cfgs in cohen.values() for c in cfgs if c.schedule == "eos"} == {"rayleigh",
                                                                                                    "critical"}
    assert all(len(cfgs) == len(SEEDS) and not any(cohen_errors(c) for c in cfgs) for cfgs in cohen.values())
    names = [c.run_name for cfgs in cohen.values() for c in cfgs]
    assert len(set(names)) == len(names)
    sgd = cohen_configs(str(tmp_path), batch=25)   # minibatch SGD: the same kinds of arm on fresh batches of 25
    assert {c.batch for cfgs in sgd.values() for c in cfgs} == {25}
    assert {c.schedule for cfgs in sgd.values() for c in cfgs} == {"constant", "cosine", "eos", "cdat"}
    assert {c.control.estimator for cfgs in sgd.values() for c in cfgs if c.schedule == "eos"} == {"rayleigh",
                                                                                                  "critical"}
    assert all(not any(cohen_errors(c) for c in cfgs) for cfgs in sgd.values())
    sgd_names = [c.run_name for cfgs in sgd.values() for c in cfgs]
    assert len(set(sgd_names)) == len(sgd_names) and all(n.startswith("sgd-b25-") for n in sgd_names)


def test_paired_ratio_is_the_geometric_mean_with_a_t_interval_on_log_ratios():
    from experiments.lr_findings import paired_ratio
    from probes.sharpness import t_quantile

    logs = np.log([0.5, 1.0, 2.0 * 1.1])   # ratios 0.5, 1, 2.2 over three seeds
    r, lo, hi = paired_ratio([0.5, 2.0, 2.2], [1.0, 2.0, 1.0])
    h = t_quantile(0.975, 2) * logs.std(ddof=1) / math.sqrt(3)
    assert r == pytest.approx(math.exp(logs.mean())) and (lo, hi) == pytest.approx(
        (math.exp(logs.mean() - h), math.exp(logs.mean() + h)))
    assert all(math.isnan(x) for x in paired_ratio([math.inf, 1.0], [1.0, 1.0]))   # a diverged seed: no ratio
    assert paired_ratio([2.0], [1.0])[0] == pytest.approx(2.0) and paired_ratio([2.0], [1.0])[2] == math.inf

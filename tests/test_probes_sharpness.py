"""Sharpness measurements against exact values: dense Hessians, enumerated minibatches, optimizer dynamics."""
import itertools
import math

import pytest
import torch

from probes import (HessianOperator, adam_preconditioner, adam_sharpness, batch_sharpness, hutchinson_trace,
                    stability_thresholds, step_sharpness, update_sharpness)
from probes.sharpness import t_quantile
from probes.testing import mlp_problem

D = torch.float64


@pytest.fixture(scope="module")
def mlp():
    model, params, loss_fn, chunks = mlp_problem()
    op = HessianOperator(params, loss_fn, chunks)
    return model, params, loss_fn, chunks, op.dense(), op.gradient()


def test_step_and_update_sharpness_are_rayleigh_quotients(mlp):
    model, params, loss_fn, chunks, h, g = mlp
    op = HessianOperator(params, loss_fn, chunks)
    assert math.isclose(step_sharpness(op), float(g @ h @ g / (g @ g)), rel_tol=1e-10)
    u = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=D)
         for i, (n, p) in enumerate(params.items())}
    flat = torch.cat([u[n].reshape(-1) for n in params])
    before = op.hvps
    assert math.isclose(update_sharpness(op, u), float(flat @ h @ flat / (flat @ flat)), rel_tol=1e-10)
    assert op.hvps - before == 1
    with pytest.raises(ValueError, match="lacks"):
        update_sharpness(op, {})


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_preconditioner_reproduces_the_step_and_spectrum(mlp, opt_cls):
    model, params, loss_fn, chunks, _, _ = mlp_problem(seed=3) + (None, None)
    names = list(params)
    groups = [{"params": [params[n] for n in names[:2]], "lr": 3e-3},
              {"params": [params[n] for n in names[2:]], "lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-6}]
    opt = opt_cls(groups, lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        sum(loss_fn(c) for c in chunks).backward()
        opt.step()
    # P is defined by θ_{t+1} = θ_t − η P⁻¹ m_{t+1} (η = reference lr, per-group lr folded into P)
    theta0 = torch.cat([p.detach().reshape(-1) for p in params.values()])
    opt.zero_grad()
    sum(loss_fn(c) for c in chunks).backward()
    opt.step()
    theta1 = torch.cat([p.detach().reshape(-1) for p in params.values()])
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in params.values()])
    pre = adam_preconditioner(opt, params, lr=1e-3)
    torch.testing.assert_close(theta1 - theta0, -1e-3 * m / pre, rtol=1e-10, atol=1e-16)
    # spectrum of P^-½ H P^-½ against dense eigh
    op = HessianOperator(params, loss_fn, chunks)
    h = op.dense()
    s = pre.rsqrt()
    truth = torch.linalg.eigvalsh(s[:, None] * h * s[None, :]).flip(0)[:3]
    res = adam_sharpness(op, opt, lr=1e-3, k=3, tol=1e-8, max_hvps=400)
    torch.testing.assert_close(res.values, truth, rtol=1e-6, atol=0)


def test_adam_preconditioner_before_first_step_is_none():
    model, params, loss_fn, chunks = mlp_problem()
    assert adam_preconditioner(torch.optim.Adam(params.values()), params, 1e-3) is None
    with pytest.raises(ValueError, match="Adam-family"):
        adam_preconditioner(torch.optim.SGD(params.values(), lr=0.1), params, 0.1)


def _diverges(opt_factory, curvature, steps=400):
    x = torch.ones(1, dtype=D, requires_grad=True)
    opt = opt_factory([x])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * curvature * x ** 2).sum().backward()
        opt.step()
    return float(x.detach().abs()) > 1.0


@pytest.mark.parametrize("kw", [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.5, dampening=0.3)])
def test_sgd_thresholds_separate_stable_from_divergent(kw):
    lr = 0.05
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, **kw)
    thr = stability_thresholds(opt, lr)
    crit = thr.get("momentum_threshold", thr["two_over_eta"])
    factory = lambda p: torch.optim.SGD(p, lr=lr, **kw)
    assert not _diverges(factory, 0.98 * crit) and _diverges(factory, 1.02 * crit)


def test_adam_threshold_formula():
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=2e-3, betas=(0.8, 0.999))
    thr = stability_thresholds(opt, 2e-3)
    assert math.isclose(thr["adam_threshold"], (2 + 1.6) / (0.2 * 2e-3))
    assert "momentum_threshold" not in thr and math.isclose(thr["two_over_eta"], 1000.0)


def _logistic_problem(n=8, d=3):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, d, generator=g, dtype=D)
    y = (torch.rand(n, generator=g, dtype=D) < 0.5).to(D)
    w = (0.5 * torch.randn(d, generator=g, dtype=D)).requires_grad_()
    loss = lambda c: torch.nn.functional.binary_cross_entropy_with_logits(c[0] @ w, c[1])  # batch mean
    return x, y, w, loss


def test_batch_sharpness_and_gni_against_enumerated_truth():
    x, y, w, loss = _logistic_problem()
    n, b = 8, 2
    s = torch.sigmoid(x @ w.detach())
    grad = lambda idx: x[idx].T @ (s[idx] - y[idx]) / len(idx)
    hess = lambda idx: x[idx].T @ torch.diag(s[idx] * (1 - s[idx])) @ x[idx] / len(idx)
    subsets = [list(c) for c in itertools.combinations(range(n), b)]
    ghg = torch.tensor([float(grad(i) @ hess(i) @ grad(i)) for i in subsets], dtype=D)
    gg = torch.tensor([float(grad(i) @ grad(i)) for i in subsets], dtype=D)
    full = list(range(n))
    gfg = torch.tensor([float(grad(i) @ hess(full) @ grad(i)) for i in subsets], dtype=D)
    rom_truth, mor_truth = float(ghg.mean() / gg.mean()), float((ghg / gg).mean())
    gni_truth = float(gfg.mean() / (grad(full) @ grad(full)))
    assert abs(rom_truth - mor_truth) > 0.02 * rom_truth   # the two estimators really differ here

    def sample(gen):
        idx = torch.randperm(n, generator=gen)[:b]
        return [(x[idx], y[idx])]

    full_op = HessianOperator([w], loss, [(x, y)])
    for estimator in ("ratio_of_means", "mean_of_ratios"):
        res = batch_sharpness([w], loss, sample, torch.Generator().manual_seed(0), min_samples=20,
                              max_samples=1000, rse=0.05, estimator=estimator, full_op=full_op)
        assert res.rse <= 0.05 and 20 <= res.n < 1000
        assert res.rom_ci[0] <= rom_truth <= res.rom_ci[1]
        assert res.mor_ci[0] <= mor_truth <= res.mor_ci[1]
        assert res.gni_ci[0] <= gni_truth <= res.gni_ci[1]
        assert abs(res.value - (rom_truth if estimator == "ratio_of_means" else mor_truth)) < 0.2 * rom_truth
        assert res.hvps == 2 * res.n   # one H_B HVP + one full-H HVP per draw


def test_batch_sharpness_at_a_stationary_point_is_undefined_not_an_error():
    """g_B = 0 for every batch (RL with equal rewards in every group): NaN, and no draws past min_samples."""
    a = torch.diag(torch.tensor([3.0, 1.0], dtype=D))
    c = torch.tensor([0.5, -1.0], dtype=D)
    w = c.clone().requires_grad_()
    loss = lambda chunk: 0.5 * (w - c) @ a @ (w - c)

    res = batch_sharpness([w], loss, lambda gen: [None], torch.Generator().manual_seed(0), min_samples=4,
                          max_samples=50, full_op=HessianOperator([w], loss, [None]))
    assert res.n == 4
    assert math.isnan(res.ratio_of_means) and math.isnan(res.mean_of_ratios) and math.isnan(res.gni)


def test_t_quantile():
    assert abs(t_quantile(0.975, 10) - 2.2281) < 2e-3
    assert abs(t_quantile(0.975, 30) - 2.0423) < 1e-3
    assert abs(t_quantile(0.95, 1000) - 1.6464) < 1e-3


def test_hutchinson_exact_on_diagonal_and_covers_truth_on_mlp(mlp):
    from probes import LinearOperator
    d = torch.linspace(-1, 3, 40, dtype=D)
    diag = LinearOperator(40, lambda v: d * v)
    blocks = {"a": torch.arange(0, 10), "b": torch.arange(10, 40)}
    tr = hutchinson_trace(diag, torch.Generator().manual_seed(0), max_probes=3, min_probes=3, blocks=blocks)
    assert math.isclose(tr.trace, float(d.sum()), rel_tol=1e-12)   # zᵀDz = tr D for Rademacher z
    assert math.isclose(tr.blocks["a"], float(d[:10].sum()), rel_tol=1e-12)
    model, params, loss_fn, chunks, h, _ = mlp
    est = hutchinson_trace(HessianOperator(params, loss_fn, chunks), torch.Generator().manual_seed(1),
                           max_probes=200, min_probes=50, rse=0.02)
    assert abs(est.trace - float(h.trace())) <= 4 * est.se and est.hvps == est.n


def test_mean_of_ratios_skips_draws_with_zero_gradient():
    """Some minibatches have g_B = 0 (e.g. PPO groups with equal rewards): their Rayleigh quotient is undefined,
    so the mean of ratios is over the other draws (it was NaN), like the ratio of means, which weights them 0."""
    a = torch.diag(torch.tensor([3.0, 1.0], dtype=D))
    c = torch.tensor([0.5, -1.0], dtype=D)
    w = c.clone().requires_grad_()
    shift = torch.tensor([1.0, 1.0], dtype=D)
    loss = lambda moved: 0.5 * (w - c - shift * moved) @ a @ (w - c - shift * moved)   # g = -A·shift if moved else 0
    g = -a @ shift
    truth = float(g @ a @ g / (g @ g))   # g = -(3, 1): (27 + 1) / (9 + 1) = 2.8
    sample = lambda gen: [float(torch.rand(1, generator=gen, dtype=D)) < 0.5]
    for estimator in ("ratio_of_means", "mean_of_ratios"):
        res = batch_sharpness([w], loss, sample, torch.Generator().manual_seed(0), min_samples=8, max_samples=50,
                              estimator=estimator)
        assert 0 < sum(gg == 0 for gg in res.samples["gg"]) < res.n   # both kinds of draws happened
        assert res.mean_of_ratios == pytest.approx(truth) and res.ratio_of_means == pytest.approx(truth)
        assert res.n == 8   # every nonzero draw agrees: the stop rule is met at min_samples for both estimators

"""Cheap traces between eigen-solves, against ground truth: critical sharpness (forward-only line search) on a
quadratic where the loss along the line is exact, the warm Rayleigh quotient and the eigenvector/gradient
alignment on a dense Hessian."""
import math

import pytest
import torch

from probes import HessianOperator, ProbeConfig, ProbeContext, Prober, critical_sharpness, critical_step
from probes.testing import mlp_problem

D = torch.float64


def quadratic(n: int = 20, seed: int = 0):
    """L(θ) = ½θᵀAθ − bᵀθ, A SPD with eigenvalues 0.1..10, as one parameter and one chunk."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    a = q @ torch.diag(torch.logspace(-1, 1, n, dtype=D)) @ q.T
    b = torch.randn(n, generator=g, dtype=D)
    theta = torch.nn.Parameter(torch.randn(n, generator=g, dtype=D))

    def loss_fn(_chunk):
        return 0.5 * theta @ a @ theta - b @ theta
    return {"theta": theta}, loss_fn, [None], a, b


@pytest.mark.parametrize("lr", [0.02, 0.2, 0.5, 2.0])
def test_critical_sharpness_on_a_quadratic_is_gAg_over_gg(lr):
    params, loss_fn, chunks, a, b = quadratic()
    theta = params["theta"]
    g = (a @ theta - b).detach()
    truth = float(g @ a @ g / (g @ g))           # ηc = 2gᵀg/gᵀAg along u = −ηg
    update = {"theta": -lr * g}
    tight = critical_sharpness(params, loss_fn, chunks, update, lr, from_previous=False, rtol=1e-6,
                               max_forwards=60)
    assert math.isclose(tight.value, truth, rel_tol=1e-5)
    assert math.isclose(tight.eta, 2 / truth, rel_tol=1e-5)
    default = critical_sharpness(params, loss_fn, chunks, update, lr, from_previous=False)
    assert math.isclose(default.value, truth, rel_tol=0.05)
    assert default.forwards <= 12, default.forwards   # Kalra et al. 2026: < 10 given the update


def test_from_previous_starts_where_the_step_started_and_restores_theta_exactly():
    params, loss_fn, chunks, a, b = quadratic()
    theta = params["theta"]
    g = (a @ theta - b).detach()
    lr = 0.3
    truth = float(g @ a @ g / (g @ g))
    with torch.no_grad():
        theta.add_(-lr * g)                       # the trainer probes after stepping
    before, version = theta.detach().clone(), theta._version
    cs = critical_sharpness(params, loss_fn, chunks, {"theta": -lr * g}, lr, rtol=1e-6, max_forwards=60)
    assert math.isclose(cs.value, truth, rel_tol=1e-5)
    assert torch.equal(theta.detach(), before) and theta._version == version


def test_float32_weights_come_back_bit_for_bit():
    model, params, loss_fn, chunks = mlp_problem(dtype=torch.float32)
    update = {n: 1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in params.items()}
    critical_sharpness(params, loss_fn, chunks, update, 0.1)
    assert all(torch.equal(p.detach(), before[n]) for n, p in params.items())


def test_line_search_edge_cases():
    # f(s) = (s − 3)² − 9 rises above f(0) = 0 at s_c = 6 exactly
    s, n, f0 = critical_step(lambda s: (s - 3) ** 2 - 9, rtol=1e-4, max_evals=40)
    assert math.isclose(s, 6.0, rel_tol=1e-4) and f0 == 0.0
    # ascent at every step: given up after f(0), f(1), f(½) and the floor 2^-18, not after 18 halvings
    s, n, _ = critical_step(lambda s: s, max_evals=20)
    assert math.isnan(s) and n == 4
    s, n, _ = critical_step(lambda s: s, max_evals=20, guess=3.0, rtol=0.1)   # warm: from guess·(1 − rtol)
    assert math.isnan(s) and n == 4
    s, n, _ = critical_step(lambda s: -s, max_evals=20)                  # never rises: no bracket
    assert math.isnan(s) and n == 20
    # s_c = 0.02, below ½: the jump to the floor brackets it, geometric then plain bisection resolve it (the Prober's
    # 10-pass budget: floor 1/256; 20 passes: 2^-18, one more geometric cut)
    for rtol in (0.05, 0.15):
        for budget, most in ((10, 10), (20, 12)):
            s, n, _ = critical_step(lambda s: (s - 0.01) ** 2, rtol=rtol, max_evals=budget)
            assert abs(s / 0.02 - 1) <= rtol / (1 - rtol) and n <= most, (rtol, budget, s, n)
    # below the floor 2^-(max_evals − 2) it is NaN, as halving within the budget would leave it: s_c = 0.002
    s, n, _ = critical_step(lambda s: (s - 0.001) ** 2, rtol=0.15, max_evals=10)
    assert math.isnan(s) and n == 4
    s, n, _ = critical_step(lambda s: (s - 0.001) ** 2, rtol=0.15, max_evals=20)
    assert abs(s / 0.002 - 1) <= 0.15 / 0.85 and n <= 10, (s, n)
    # s_c ∈ (½, 1]: f(0), f(1), f(½) bracket it within a factor 2, then 1–2 bisections at rtol 0.15
    for sc in (0.55, 0.7, 0.9, 1.0):
        s, n, _ = critical_step(lambda s, sc=sc: s * (s - sc), rtol=0.15)
        assert abs(s / sc - 1) <= 0.15 / 0.85 and n <= 5, (sc, s, n)


def test_rayleigh_and_alignment_on_the_stored_eigenvector_match_dense_ground_truth():
    model, params, loss_fn, chunks = mlp_problem(chunk=64)
    pr = Prober(ProbeConfig(every=10, rayleigh_every=1, alignment_every=1, critical_every=0, step_sharpness=False,
                            update_sharpness=False, stop="residual"))
    fresh = pr(ProbeContext(params, loss_fn, chunks, lr=0.1, step=3, model=model))
    assert "probe/rayleigh" not in fresh and "probe/alignment" not in fresh   # no eigenvector stored yet
    first = pr(ProbeContext(params, loss_fn, chunks, lr=0.1, step=0, model=model))
    assert first["probe/rayleigh"] == first["probe/lambda_max"]              # solved this step: 0 HVPs
    with torch.no_grad():                                                    # a small "training step"
        for p in params.values():
            p.add_(1e-2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=D))
    v = pr.state_dict()["warm.H"][:, 0]
    op = HessianOperator(params, loss_fn, chunks)
    h, g = op.dense(), op.gradient()
    out = pr(ProbeContext(params, loss_fn, chunks, lr=0.1, step=1, model=model))
    assert math.isclose(out["probe/rayleigh"], float(v @ h @ v / (v @ v)), rel_tol=1e-10)
    assert math.isclose(out["probe/alignment"], abs(float(v @ g)) / float(v.norm() * g.norm()), rel_tol=1e-10)
    assert out["probe/hvps"] == 1.0 and "probe/lambda_max" not in out
    assert out["probe/rayleigh"] <= float(torch.linalg.eigvalsh(h)[-1]) + 1e-12


def test_critical_sharpness_in_the_prober_reads_the_last_update():
    model, params, loss_fn, chunks = mlp_problem(chunk=64)
    lr = 0.05
    op = HessianOperator(params, loss_fn, chunks)
    g = op.gradient()
    sizes = [p.numel() for p in params.values()]
    update = {n: -lr * part.view_as(p) for (n, p), part in zip(params.items(), torch.split(g, sizes))}
    with torch.no_grad():                                    # θ_t = θ_{t-1} + Δθ: a GD step
        for n, p in params.items():
            p.add_(update[n])
    pr = Prober(ProbeConfig(every=100, critical_every=5, critical_chunks=0, critical_rtol=0.05,
                            critical_max_forwards=20))
    assert "probe/critical_sharpness" not in pr(ProbeContext(params, loss_fn, chunks, lr=lr, step=5, model=model))
    out = pr(ProbeContext(params, loss_fn, chunks, lr=lr, step=5, model=model, update=update))
    direct = critical_sharpness(params, loss_fn, chunks, update, lr, rtol=0.05, max_forwards=20)
    assert out["probe/critical_sharpness"] == direct.value and out["probe/critical_forwards"] == direct.forwards
    assert out["probe/hvps"] == 0.0                       # forward passes only
    # the default evaluates the first chunk only: the line search of that chunk's loss, a different ηc (resolved
    # finely enough here to tell them apart)
    assert len(chunks) > 1 and ProbeConfig().critical_chunks == 1
    fine = {"rtol": 1e-3, "max_forwards": 40}
    first = Prober(ProbeConfig(every=100, critical_every=5, critical_rtol=1e-3, critical_max_forwards=40))(
        ProbeContext(params, loss_fn, chunks, lr=lr, step=5, model=model, update=update))
    subset = critical_sharpness(params, loss_fn, chunks[:1], update, lr, **fine)
    assert first["probe/critical_sharpness"] == subset.value
    assert subset.value != critical_sharpness(params, loss_fn, chunks, update, lr, **fine).value
    # near θ_{t-1} the loss is close to its quadratic model: λc ≈ gᵀHg/gᵀg at θ_{t-1}
    with torch.no_grad():
        for n, p in params.items():
            p.sub_(update[n])
    rho = float(g @ op.matvec(g) / (g @ g))
    assert math.isclose(out["probe/critical_sharpness"], rho, rel_tol=0.1)


def test_a_warm_line_search_costs_three_forward_passes_when_eta_c_has_not_moved():
    params, loss_fn, chunks, a, b = quadratic()
    g = (a @ params["theta"] - b).detach()
    truth = float(g @ a @ g / (g @ g))
    update, lr = {"theta": -0.2 * g}, 0.2
    cold = critical_sharpness(params, loss_fn, chunks, update, lr, from_previous=False)
    warm = critical_sharpness(params, loss_fn, chunks, update, lr, from_previous=False, eta_guess=2 / truth)
    assert warm.forwards == 3 and math.isclose(warm.value, truth, rel_tol=0.05) and cold.forwards > 3
    far = critical_sharpness(params, loss_fn, chunks, update, lr, from_previous=False, eta_guess=20 / truth)
    assert math.isclose(far.value, truth, rel_tol=0.05) and far.forwards <= 12   # a stale guess still brackets


def test_the_prober_warm_starts_critical_sharpness_from_its_checkpointed_state():
    model, params, loss_fn, chunks = mlp_problem(chunk=64)
    update = {n: -1e-3 * torch.ones_like(p) for n, p in params.items()}
    pr = Prober(ProbeConfig(every=100, critical_every=1, rayleigh_every=0, alignment_every=0))
    ctx = ProbeContext(params, loss_fn, chunks, lr=0.05, step=1, model=model, update=update)
    first = pr(ctx)
    resumed = Prober(pr.config)
    resumed.load_state_dict(pr.state_dict())
    second = resumed(ctx)
    assert second["probe/critical_forwards"] == 3 < first["probe/critical_forwards"]
    assert math.isclose(second["probe/critical_sharpness"], first["probe/critical_sharpness"], rel_tol=0.1)

"""Prober: cadence, metric keys with correct values, warm starts, and no side effects (bitwise)."""
import math
import random

import numpy as np
import pytest
import torch

from probes import HessianOperator, ProbeConfig, ProbeContext, Prober
from probes.testing import mlp_problem, neox_batch, neox_loss_fn, tiny_neox

D = torch.float64
CONTRACT_KEYS = {"probe/lambda_max", "probe/two_over_eta", "probe/adam_lambda_max", "probe/adam_threshold",
                 "probe/batch_sharpness", "probe/batch_sharpness_ci_lo", "probe/batch_sharpness_ci_hi",
                 "probe/batch_sharpness_n", "probe/batch_sharpness_mor", "probe/update_sharpness",
                 "probe/step_sharpness", "probe/trace", "probe/gni", "probe/hvps", "probe/seconds",
                 "probe/converged"}


def test_cadence_and_disabled():
    pr = Prober(ProbeConfig(every=10, batch_sharpness_every=25, trace_every=0))
    assert [s for s in range(60) if pr.due(s)] == [0, 10, 20, 25, 30, 40, 50]
    off = Prober(ProbeConfig(every=0, batch_sharpness_every=5))
    assert not any(off.due(s) for s in range(20))
    model, params, loss_fn, chunks = mlp_problem()
    assert off(ProbeContext(params, loss_fn, chunks, lr=0.1, step=0)) == {}
    assert pr(ProbeContext(params, loss_fn, chunks, lr=0.1, step=3)) == {}


def test_config_rejects_bad_values():
    for kw in (dict(every=-1), dict(mode="jvp"), dict(batch_estimator="median"), dict(confidence=1.5),
               dict(batch_min_samples=10, batch_max_samples=5), dict(k=2, max_hvps=1)):
        with pytest.raises(ValueError):
            ProbeConfig(**kw)


def _snapshot(model, opt):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "opt": {k: (v.clone() if torch.is_tensor(v) else v) for st in opt.state.values() for k, v in st.items()},
        "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
        "modes": [m.training for m in model.modules()],
    }


def _assert_same(a, b):
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
    assert all((a["grads"][n] is None and b["grads"][n] is None) or torch.equal(a["grads"][n], b["grads"][n])
               for n in a["grads"])
    assert all(torch.equal(v, b["opt"][k]) if torch.is_tensor(v) else v == b["opt"][k] for k, v in a["opt"].items())
    assert torch.equal(a["rng"][0], b["rng"][0]) and np.array_equal(a["rng"][1], b["rng"][1])
    assert a["rng"][2] == b["rng"][2] and a["modes"] == b["modes"]


@pytest.mark.parametrize("mode", ["cache", "fd"])
def test_no_side_effects_on_lora_gpt_neox_with_adam(mode):
    model = tiny_neox(hidden=16, heads=2, vocab=20, lora_rank=2)
    model.train()
    model.base_model.model.gpt_neox.layers[0].eval()   # a mixed train/eval state must come back exactly
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lf, chunks = neox_loss_fn(model), neox_batch(vocab=20)
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    sum(lf(c) for c in chunks).backward()
    opt.step()                                           # Adam state exists, .grad is populated
    pool = neox_batch(batch=16, vocab=20, seed=3)

    def sample(gen):
        i = int(torch.randint(0, len(pool), (1,), generator=gen))
        return [pool[i]]

    cfg = ProbeConfig(every=1, mode=mode, batch_sharpness_every=1, gni=True, batch_min_samples=2,
                      batch_max_samples=3, trace_every=1, trace_max_probes=2, blocks_every=1, max_hvps=10,
                      step_sharpness=True)
    ctx = ProbeContext(params, lf, chunks, lr=1e-3, step=4, optimizer=opt, model=model, sample_batch=sample,
                       update={n: torch.ones_like(p) for n, p in params.items()})
    before = _snapshot(model, opt)
    out = Prober(cfg)(ctx)
    _assert_same(before, _snapshot(model, opt))
    assert CONTRACT_KEYS <= set(out) and all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert {"probe/block/lora_A/trace", "probe/block/lora_B/lambda_max"} <= set(out)


def test_values_match_ground_truth_and_warm_start_is_cheaper():
    model, params, loss_fn, chunks = mlp_problem(chunk=64)
    h = HessianOperator(params, loss_fn, chunks).dense()
    opt = torch.optim.SGD(params.values(), lr=0.05, momentum=0.9)
    pr = Prober(ProbeConfig(every=1, k=2, stop="residual"))   # residual rule: eigenpairs to tol, λ far tighter
    out = pr(ProbeContext(params, loss_fn, chunks, lr=0.05, step=0, optimizer=opt, model=model))
    evals = torch.linalg.eigvalsh(h)
    assert math.isclose(out["probe/lambda_max"], float(evals[-1]), rel_tol=1e-5)
    assert math.isclose(out["probe/lambda_2"], float(evals[-2]), rel_tol=1e-4)
    assert out["probe/two_over_eta"] == 40.0 and math.isclose(out["probe/momentum_threshold"], 3.8 / 0.05)
    cold = out["probe/hvps"]
    with torch.no_grad():                     # one small "training step"
        for p in params.values():
            p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=D))
    warm = pr(ProbeContext(params, loss_fn, chunks, lr=0.05, step=1, optimizer=opt, model=model))["probe/hvps"]
    assert warm < cold and warm <= 2 * 4 + 1   # ≤4 per eigenvector (+1 for step sharpness)


def _train(with_probes: bool, steps: int = 6):
    """SGD+momentum on an MLP with dropout (training consumes the global RNG), probed or not."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, 1, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = lambda c: ((model(c[0]) - c[1]) ** 2).sum() / 64
    chunks = [(x[:32], y[:32]), (x[32:], y[32:])]

    def sample(gen):
        idx = torch.randperm(64, generator=gen)[:8]
        return [(x[idx], y[idx] * 0 + y[idx])]

    prober = Prober(ProbeConfig(every=2, batch_sharpness_every=3, batch_min_samples=2, batch_max_samples=2,
                                trace_every=3, trace_max_probes=2, eval_mode=False))
    for step in range(steps):
        model.train()
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        before = {n: p.detach().clone() for n, p in params.items()}
        opt.step()
        if with_probes and prober.due(step):
            update = {n: p.detach() - before[n] for n, p in params.items()}
            prober(ProbeContext(params, loss_fn, chunks, lr=0.1, step=step, optimizer=opt, model=model,
                                sample_batch=sample, update=update))
        torch.rand(1)   # the trainer keeps drawing from the global RNG
    return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()


def test_training_is_bitwise_identical_with_and_without_probes():
    (a, rng_a), (b, rng_b) = _train(False), _train(True)
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and torch.equal(rng_a, rng_b)


def test_default_eigenvalue_stop_meets_its_tolerance_with_fewer_hvps():
    model, params, loss_fn, chunks = mlp_problem(chunk=64)
    truth = float(torch.linalg.eigvalsh(HessianOperator(params, loss_fn, chunks).dense())[-1])
    cfg = ProbeConfig(every=1, step_sharpness=False, update_sharpness=False)
    assert cfg.stop == "eigenvalue"
    out = {}
    for stop in ("eigenvalue", "residual"):
        ctx = ProbeContext(params, loss_fn, chunks, lr=0.05, step=0, model=model)
        # cold_stop="": this cold solve by ``stop`` itself (the default solves cold by the residual rule)
        out[stop] = Prober(ProbeConfig(every=1, step_sharpness=False, update_sharpness=False, stop=stop,
                                       cold_stop=""))(ctx)
    assert abs(out["eigenvalue"]["probe/lambda_max"] - truth) <= cfg.tol * truth
    assert out["eigenvalue"]["probe/hvps"] < out["residual"]["probe/hvps"]


def test_step_and_update_sharpness_hvps_seed_warm_solves_but_never_trap_cold_ones():
    # L(θ) = ½ θᵀAθ, spectrum 7 > 5 > … with −9 below: g = Aθ, and θ on an eigenvector makes g one too.
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=torch.Generator().manual_seed(0), dtype=D))
    evals = torch.cat([torch.tensor([7.0, 5.0, -9.0], dtype=D), torch.linspace(-1, 1, 37, dtype=D)])
    a = q @ torch.diag(evals) @ q.T
    theta = torch.nn.Parameter(0.5 * q[:, 0].clone())

    def loss_fn(_):
        return 0.5 * theta @ a @ theta
    ctx = ProbeContext({"theta": theta}, loss_fn, [None], lr=0.1, step=0,
                       update={"theta": torch.randn(40, generator=torch.Generator().manual_seed(2), dtype=D)})
    # Warm, from a stale vector x₂ (an exact eigenvector: Krylov from it alone never leaves it) with g = x_top:
    # the known pair (g, Hg) puts the answer into the first Rayleigh–Ritz, so the solve costs its one start HVP.
    pr = Prober(ProbeConfig(every=1, tol=1e-8, step_sharpness=True))
    pr._warm["H"] = q[:, 1:2].clone()
    out = pr(ctx)
    assert math.isclose(out["probe/lambda_max"], 7.0, rel_tol=1e-10)
    assert math.isclose(out["probe/step_sharpness"], 7.0, rel_tol=1e-10)
    assert out["probe/hvps"] == 3 and out["probe/converged"] == 1.0   # step + update + the warm start
    # Cold with θ on x₂: g spans an invariant subspace without x_top. Beside a random start it would win the first
    # Rayleigh–Ritz (θ = 5) and trap the solve, so a cold solve starts from the random vector alone.
    with torch.no_grad():
        theta.copy_(0.5 * q[:, 1])
    out = Prober(ProbeConfig(every=1, tol=1e-8, update_sharpness=False, step_sharpness=True))(ctx)
    assert math.isclose(out["probe/step_sharpness"], 5.0, rel_tol=1e-10)
    assert math.isclose(out["probe/lambda_max"], 7.0, rel_tol=1e-8)
    assert out["probe/converged"] == 1.0
    # the trap is real for a solve started from g, which is why lambda_max starts from g only on request
    from probes import lambda_max
    trapped = lambda_max({"theta": theta}, loss_fn, [None], tol=1e-8, init="gradient")
    assert math.isclose(float(trapped.values[0]), 5.0, rel_tol=1e-8)
    assert math.isclose(float(lambda_max({"theta": theta}, loss_fn, [None], tol=1e-8).values[0]), 7.0, rel_tol=1e-8)
    with pytest.raises(ValueError, match="gradient"):
        lambda_max({"theta": theta}, loss_fn, [None], init="grad")

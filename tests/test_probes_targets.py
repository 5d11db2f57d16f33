"""Probe targets are explicit: probe/lambda_max is the top eigenvalue of the Hessian of the mean loss over the fixed
probe set (ProbeContext.probe_set), the same set at every step; probe/lambda_max_batch is the current batch's."""
import math

import torch

from probes import HessianOperator, ProbeConfig, ProbeContext, Prober

D = torch.float64


def problem(seed: int = 0):
    """Tanh MLP regression on 96 points; chunk = (x, y, N): its squared error / N, N the size of the set it cuts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 5, generator=g, dtype=D)
    y = torch.sin(x.sum(1, keepdim=True))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)).to(D)

    def loss_fn(c):
        return ((model(c[0]) - c[1]) ** 2).sum() / c[2]

    def chunks(idx, size=16):
        idx = list(idx)
        return [(x[idx[i:i + size]], y[idx[i:i + size]], len(idx)) for i in range(0, len(idx), size)]
    return model, dict(model.named_parameters()), loss_fn, chunks, (x, y)


def dense_top(params, loss_fn, chunks) -> float:
    return float(torch.linalg.eigvalsh(HessianOperator(params, loss_fn, chunks).dense())[-1])


def mean_loss_hessian(model, params, x, y) -> torch.Tensor:
    """Dense Hessian of the plain mean squared error over (x, y), by torch.autograd.functional (no chunks)."""
    names, sizes = list(params), [p.numel() for p in params.values()]

    def mean_loss(*ps):
        return ((torch.func.functional_call(model, dict(zip(names, ps)), (x,)) - y) ** 2).mean()
    h = torch.autograd.functional.hessian(mean_loss, tuple(p.detach() for p in params.values()))
    n = len(names)
    return torch.cat([torch.cat([h[i][j].reshape(sizes[i], sizes[j]) for j in range(n)], 1) for i in range(n)], 0)


def test_lambda_max_is_the_probe_set_hessian_and_the_batch_has_its_own_key():
    model, params, loss_fn, chunks, (x, y) = problem()
    probe_set = chunks(range(0, 64))            # a fixed subset of the training set, in 4 chunks
    batch = chunks(range(64, 80))               # the current minibatch (other examples)
    h_set = mean_loss_hessian(model, params, x[:64], y[:64])
    torch.testing.assert_close(HessianOperator(params, loss_fn, probe_set).dense(), h_set, rtol=1e-10, atol=1e-12)
    truth = float(torch.linalg.eigvalsh(h_set)[-1])
    pr = Prober(ProbeConfig(every=1, stop="residual", tol=1e-6, update_sharpness=False, rayleigh_every=0,
                            alignment_every=0, critical_every=0, batch_lambda_max=True, step_sharpness=True))
    out = pr(ProbeContext(params, loss_fn, batch, lr=0.1, step=0, model=model, probe_set=probe_set))
    assert math.isclose(out["probe/lambda_max"], truth, rel_tol=1e-6)
    batch_truth = float(torch.linalg.eigvalsh(mean_loss_hessian(model, params, x[64:80], y[64:80]))[-1])
    assert math.isclose(out["probe/lambda_max_batch"], batch_truth, rel_tol=1e-6)
    assert abs(truth - batch_truth) > 1e-2 * truth   # the minibatch's Hessian is another matrix
    # step sharpness stays the current batch's: g_Bᵀ H_B g_B / ‖g_B‖²
    op_b = HessianOperator(params, loss_fn, batch)
    g = op_b.gradient()
    assert math.isclose(out["probe/step_sharpness"], float(g @ op_b.matvec(g)) / float(g @ g), rel_tol=1e-9)
    assert out["probe/converged"] == 1.0
    # off by default: no batch solve, the same probe-set numbers, the HVPs of the batch's solve saved
    default = Prober(ProbeConfig(every=1, stop="residual", tol=1e-6, update_sharpness=False, rayleigh_every=0,
                                 alignment_every=0, critical_every=0, step_sharpness=True))(
        ProbeContext(params, loss_fn, batch, lr=0.1, step=0, model=model, probe_set=probe_set))
    assert "probe/lambda_max_batch" not in default and default["probe/hvps"] < out["probe/hvps"]
    # (the same to rounding: the batch solve's random start no longer draws from the step's generator)
    assert math.isclose(default["probe/lambda_max"], out["probe/lambda_max"], rel_tol=1e-9)
    assert default["probe/step_sharpness"] == out["probe/step_sharpness"]


def test_the_probe_set_is_the_same_across_steps_while_batches_change():
    model, params, loss_fn, chunks, _ = problem()
    probe_set = chunks(range(0, 64))
    pr = Prober(ProbeConfig(every=1, stop="residual", tol=1e-6, rayleigh_every=0, alignment_every=0,
                            critical_every=0, batch_lambda_max=True))
    a = pr(ProbeContext(params, loss_fn, chunks(range(64, 80)), lr=0.1, step=0, model=model, probe_set=probe_set))
    b = pr(ProbeContext(params, loss_fn, chunks(range(80, 96)), lr=0.1, step=1, model=model, probe_set=probe_set))
    assert math.isclose(a["probe/lambda_max"], b["probe/lambda_max"], rel_tol=1e-6)   # same θ, same set
    assert abs(a["probe/lambda_max_batch"] - b["probe/lambda_max_batch"]) > 1e-3 * a["probe/lambda_max_batch"]


def test_without_a_probe_set_the_batch_is_the_probe_set_at_no_extra_cost():
    model, params, loss_fn, chunks, _ = problem()
    batch = chunks(range(0, 64))
    cfg = ProbeConfig(every=1, rayleigh_every=0, alignment_every=0, critical_every=0)
    out = Prober(cfg)(ProbeContext(params, loss_fn, batch, lr=0.1, step=0, model=model))
    assert out["probe/lambda_max_batch"] == out["probe/lambda_max"]
    same = Prober(cfg)(ProbeContext(params, loss_fn, batch, lr=0.1, step=0, model=model, probe_set=batch))
    assert same["probe/hvps"] == out["probe/hvps"] and same["probe/lambda_max_batch"] == same["probe/lambda_max"]


def test_the_batch_graph_and_the_probe_set_graph_are_never_alive_together(monkeypatch):
    # peak probe memory is one cached graph, not two: the batch's kinds run first and free its graph
    model, params, loss_fn, chunks, _ = problem()
    probe_set, batch = chunks(range(0, 64)), chunks(range(64, 80))
    live, seen = [], []
    build = HessianOperator._build_graph

    def tracked(self):
        seen.append(sum(op._graph is not None for op in live if op is not self))
        live.append(self)
        build(self)

    monkeypatch.setattr(HessianOperator, "_build_graph", tracked)
    out = Prober(ProbeConfig(every=1, rayleigh_every=1, alignment_every=1, critical_every=0, batch_lambda_max=True))(
        ProbeContext(params, loss_fn, batch, lr=0.1, step=0, model=model, probe_set=probe_set,
                     update={n: 1e-3 * torch.ones_like(p) for n, p in params.items()}))
    assert {"probe/lambda_max", "probe/lambda_max_batch", "probe/update_sharpness", "probe/rayleigh"} <= set(out)
    assert len(seen) >= 2 and seen == [0] * len(seen), seen

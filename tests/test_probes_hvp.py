"""HessianOperator against closed forms and torch.autograd.functional.hessian in float64."""
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from probes import HessianOperator, lambda_max, top_eigenvalues
from probes.testing import mlp_problem, neox_batch, neox_loss_fn, tiny_neox

from conftest import DEVICES

D = torch.float64


def dense_hessian(model, params, loss_fn, chunks):
    """Ground truth: autograd.functional.hessian of Σ_c loss over the flat ``params`` (by functional_call)."""
    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, chunk):
            return loss_fn(chunk)

    wrap = Wrap()
    base = {n: p.detach() for n, p in wrap.named_parameters()}
    names, sizes = list(params), [p.numel() for p in params.values()]

    def f(flat):
        d = dict(base)
        for n, t in zip(names, torch.split(flat, sizes)):
            d["model." + n] = t.view(params[n].shape)
        return sum(torch.func.functional_call(wrap, d, (c,)) for c in chunks)

    flat0 = torch.cat([p.detach().reshape(-1) for p in params.values()])
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(f, flat0, vectorize=True)


def test_linear_regression_closed_form():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g, dtype=D), torch.randn(40, generator=g, dtype=D)
    w = torch.zeros(5, dtype=D, requires_grad=True)
    chunks = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)]
    op = HessianOperator([w], lambda c: ((c[0] @ w - c[1]) ** 2).sum() / 40, chunks)
    torch.testing.assert_close(op.dense(), 2 / 40 * x.T @ x, rtol=1e-12, atol=1e-12)
    res = top_eigenvalues(op, k=2, tol=1e-10)
    torch.testing.assert_close(res.values, torch.linalg.eigvalsh(2 / 40 * x.T @ x).flip(0)[:2], rtol=1e-10, atol=0)


def test_logistic_regression_closed_form():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 7, generator=g, dtype=D)
    y = (torch.rand(60, generator=g, dtype=D) < 0.5).to(D)
    w = (0.3 * torch.randn(7, generator=g, dtype=D)).requires_grad_()
    loss = lambda c: torch.nn.functional.binary_cross_entropy_with_logits(c[0] @ w, c[1], reduction="sum") / 60
    op = HessianOperator([w], loss, [(x[:25], y[:25]), (x[25:], y[25:])])
    s = torch.sigmoid(x @ w.detach())
    truth = x.T @ torch.diag(s * (1 - s)) @ x / 60
    torch.testing.assert_close(op.dense(), truth, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(op.gradient(), x.T @ (s - y) / 60, rtol=1e-12, atol=1e-14)


def test_mlp_against_autograd_hessian_and_modes_agree():
    model, params, loss_fn, chunks = mlp_problem()
    truth = dense_hessian(model, params, loss_fn, chunks)
    evals = torch.linalg.eigvalsh(truth).flip(0)
    v = torch.randn(truth.shape[0], generator=torch.Generator().manual_seed(0), dtype=D)
    for mode, rtol in (("cache", 1e-12), ("recompute", 1e-12), ("fd", 1e-6)):
        op = HessianOperator(params, loss_fn, chunks, mode=mode)
        torch.testing.assert_close(op.matvec(v), truth @ v, rtol=rtol, atol=rtol * float((truth @ v).abs().max()))
        res = top_eigenvalues(op, k=3, tol=1e-6, max_hvps=300)
        torch.testing.assert_close(res.values, evals[:3], rtol=1e-6, atol=0)
    op = HessianOperator(params, loss_fn, chunks)
    torch.testing.assert_close(op.dense().trace(), truth.trace(), rtol=1e-10, atol=0)


def test_cache_is_rebuilt_after_inplace_update():
    model, params, loss_fn, chunks = mlp_problem()
    op = HessianOperator(params, loss_fn, chunks, mode="cache")
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=D)
    before = op.matvec(v)
    with torch.no_grad():
        for p in params.values():
            p.mul_(1.1)
    fresh = HessianOperator(params, loss_fn, chunks, mode="recompute").matvec(v)
    after = op.matvec(v)
    assert (after - before).norm() > 1e-3 * before.norm()
    torch.testing.assert_close(after, fresh, rtol=1e-12, atol=1e-12)


def test_saved_bytes_counts_distinct_storages_and_not_the_parameters():
    from probes.hvp import _SavedBytes
    x = torch.randn(1000, requires_grad=True)
    p = torch.nn.Parameter(torch.randn(1000))
    with _SavedBytes([p]) as saved:
        (torch.exp(x) * p).sum()
    # exp saves its output (4000 B); mul saves that same tensor (counted once) and p (a parameter: not counted)
    assert saved.bytes == 4000


def test_bounded_cache_equals_the_unbounded_one_bit_for_bit_under_dropout():
    """cache_mb keeps the first chunks' graphs while they fit and recomputes the rest from the RNG state each was
    built with: a model in train mode (dropout) gives bit for bit the unbounded cache's HVPs and gradient, whether
    0, some or all chunks fit."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, generator=g), torch.randn(96, 1, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(32, 1)).train()
    params = dict(model.named_parameters())
    chunks = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 96, 16)]

    def loss_fn(c):
        return ((model(c[0]) - c[1]) ** 2).sum() / 96
    v = torch.randn(sum(p.numel() for p in params.values()), generator=g)
    whole = HessianOperator(params, loss_fn, chunks, model=model)
    want, want_g = whole.matvec(v), whole.gradient()
    assert whole.cached_chunks == 6
    recompute = HessianOperator(params, loss_fn, chunks, mode="recompute", model=model)
    assert torch.equal(recompute.matvec(v), want)
    seen = set()
    for mb in (1e-6, 0.01, 0.02, 0.05, 10.0):
        op = HessianOperator(params, loss_fn, chunks, model=model, cache_mb=mb)
        for _ in range(2):   # the recomputed chunks again: the same masks at every HVP
            assert torch.equal(op.matvec(v), want), mb
        assert torch.equal(op.gradient(), want_g)
        seen.add(op.cached_chunks)
    assert seen == {0, 6} | (seen - {0, 6}) and len(seen) >= 3, seen   # none, some and all chunks cached
    # and other masks would show: an operator built from another RNG state differs
    torch.rand(1)
    other = HessianOperator(params, loss_fn, chunks, model=model)
    assert not torch.equal(other.matvec(v), want)
    with pytest.raises(ValueError, match="cache_mb"):
        HessianOperator(params, loss_fn, chunks, cache_mb=-1)


def test_a_released_bounded_cache_leaves_no_tensor_alive():
    """Counting saved bytes must not keep the graphs alive: with the collector off (and after a collection), a
    bounded operator built, applied and released leaves no tensor behind (returning the packed tensor itself did:
    366 here, a cycle through each saved output's grad_fn that even gc.collect() cannot free)."""
    import gc
    model = tiny_neox(dtype=torch.float32)
    lf, chunks = neox_loss_fn(model), neox_batch() * 3
    params = dict(model.named_parameters())
    v = torch.randn(sum(p.numel() for p in params.values()), generator=torch.Generator().manual_seed(0))
    want = HessianOperator(params, lf, chunks, model=model).matvec(v)

    def alive():
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
    gc.collect()
    gc.disable()
    try:
        before = alive()
        op = HessianOperator(params, lf, chunks, model=model, cache_mb=0.8)
        got = op.matvec(v)
        assert 0 < op.cached_chunks < len(chunks) and torch.equal(got, want)
        op.release()
        del op, got
        assert alive() == before
    finally:
        gc.enable()
    gc.collect()
    assert alive() == before


def test_fd_restores_parameters_bitwise():
    model, params, loss_fn, chunks = mlp_problem(dtype=torch.float32)
    saved = {n: p.detach().clone() for n, p in params.items()}
    op = HessianOperator(params, loss_fn, chunks, mode="fd")
    op.matvec(torch.ones(op.dim, dtype=D))
    assert all(torch.equal(saved[n], p) for n, p in params.items())


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_neox_sdpa_full_model_eigs(device):
    """The 28k-parameter Hessian is too big for a dense oracle: check λ₁..λ₃ over the QKV biases (second
    derivatives through softmax attention), layer 1's attention output and the final norm (SDPA model: HVPs go
    through the math kernel), and the full-model HVP against finite differences; on every device of DEVICES."""
    model = tiny_neox(dtype=D).to(device)
    lf = neox_loss_fn(model)
    chunks = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in c.items()} for c in neox_batch()]
    sub = {n: p for n, p in model.named_parameters()
           if "query_key_value.bias" in n or "layers.1.attention.dense" in n or "final_layer_norm" in n}
    truth = dense_hessian(model, sub, lf, chunks)
    res = lambda_max(sub, lf, chunks, k=3, tol=1e-7, max_hvps=400, model=model)
    torch.testing.assert_close(res.values.cpu(), torch.linalg.eigvalsh(truth).flip(0)[:3].cpu(), rtol=1e-6, atol=0)
    full = dict(model.named_parameters())
    v = torch.randn(sum(p.numel() for p in full.values()), generator=torch.Generator().manual_seed(2),
                    dtype=D).to(device)
    hv = HessianOperator(full, lf, chunks, mode="cache", model=model).matvec(v)
    fd = HessianOperator(full, lf, chunks, mode="fd", model=model).matvec(v)
    assert float((hv - fd).norm() / hv.norm()) < 1e-6


def test_lora_operator_dimension_and_indefinite_spectrum():
    model = tiny_neox(hidden=16, heads=2, vocab=20, dtype=D, lora_rank=2)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lf, chunks = neox_loss_fn(model), neox_batch(vocab=20)
    op = HessianOperator(trainable, lf, chunks, model=model)
    assert op.dim == sum(p.numel() for p in model.parameters() if p.requires_grad) == 384
    assert all("lora_" in n for n in op.names)
    truth = dense_hessian(model, trainable, lf, chunks)
    evals = torch.linalg.eigvalsh(truth)
    assert evals[0] < 0 < evals[-1] and abs(evals[0]) > evals[-1]   # indefinite, most negative is largest |λ|
    res = top_eigenvalues(op, k=3, tol=1e-7, max_hvps=300)
    torch.testing.assert_close(res.values, evals.flip(0)[:3], rtol=1e-6, atol=0)
    # HVP budget: cold k=1 within 20 HVPs. This random LoRA Hessian moves fast (a step η = 0.01/λ_max changes λ_max
    # by 1.4% and turns its eigenvector by 1°), so the warm solve needs 5 HVPs here (1 at an unchanged θ), not ≤ 4.
    cold = top_eigenvalues(op, k=1, tol=1e-3)
    assert cold.converged and cold.hvps <= 20 and abs(float(cold.values[0]) / float(evals[-1]) - 1) < 1e-3
    assert top_eigenvalues(op, k=1, tol=1e-3, init=cold.vectors).hvps == 1
    g = op.gradient()
    with torch.no_grad():
        for p, gp in zip(trainable.values(), torch.split(g, [p.numel() for p in trainable.values()])):
            p.sub_(0.01 * gp.view_as(p) / float(evals[-1]))
    warm = top_eigenvalues(op, k=1, tol=1e-3, init=cold.vectors)
    assert warm.converged and warm.hvps <= 5 and 2 * warm.hvps < cold.hvps


def test_flash_attention_and_reentrant_checkpointing_are_refused():
    model = tiny_neox(dtype=D)
    lf, chunks = neox_loss_fn(model), neox_batch()
    params = dict(model.named_parameters())
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(RuntimeError, match="no double backward"):
        HessianOperator(params, lf, chunks, model=model)
    model.config._attn_implementation = "sdpa"
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with pytest.raises(RuntimeError, match="reentrant"):
        HessianOperator(params, lf, chunks, model=model)
    # without the model to inspect, the autograd error itself is explained
    with pytest.raises(RuntimeError, match="reentrant"):
        HessianOperator(params, lf, chunks).matvec(torch.ones(sum(p.numel() for p in params.values()), dtype=D))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    op = HessianOperator(params, lf, chunks, model=model)
    assert torch.isfinite(op.matvec(torch.ones(op.dim, dtype=D))).all()


def test_low_precision_warns_and_bad_input_errors():
    w = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.warns(UserWarning, match="bf16|bfloat16"):
        HessianOperator([w], lambda c: (w.float() ** 2).sum(), [None])
    with pytest.raises(ValueError, match="mode"):
        HessianOperator([w], lambda c: w.sum(), [None], mode="jvp")
    with pytest.raises(ValueError, match="empty"):
        HessianOperator([w], lambda c: w.sum(), [])
    with pytest.raises(ValueError, match="requires_grad"):
        HessianOperator([torch.zeros(3)], lambda c: 0, [None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = HessianOperator([w], lambda c: w.float().sum()[None], [None])
    with pytest.raises(ValueError, match="scalar"):
        op.matvec(torch.ones(3, dtype=D))


@pytest.fixture(scope="module")
def trained_neox_fp32():
    """The fp32 tiny GPT-NeoX after 30 SGD steps (curvature off the random init: λ_max ≈ 6.3)."""
    model = tiny_neox(hidden=32, layers=2, vocab=50)
    model.eval()
    chunks = neox_batch(batch=16, seq=16, chunk=8)
    lf = neox_loss_fn(model)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        sum(lf(c) for c in chunks).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, params, lf, chunks


def test_fd_mode_is_accurate_in_fp32_and_bounds_its_error(trained_neox_fp32):
    # A single central difference at ‖tv‖ = cbrt(eps)(1 + ‖θ‖) ≈ 0.08 was 8 % off along the top eigenvector here,
    # and its solve said converged at λ = 6.146 (cache: 6.291); step sharpness 2 % low.
    model, params, lf, chunks = trained_neox_fp32
    cache = HessianOperator(params, lf, chunks, mode="cache")
    ref = lambda_max(params, lf, chunks, tol=1e-6)
    top, g = ref.vectors[:, 0], cache.gradient()
    r = torch.randn(cache.dim, generator=torch.Generator().manual_seed(0), dtype=D)
    for u in (top, g / g.norm(), r / r.norm()):
        fd = HessianOperator(params, lf, chunks, mode="fd")
        hu, fu = cache.matvec(u), fd.matvec(u)
        err = float((fu - hu).norm())
        assert err <= fd.hvp_error  # the bound holds
        assert err < 1e-3 * float(ref.values[0])  # and Hv is accurate to well under tol·λ_max
    res = lambda_max(params, lf, chunks, mode="fd", tol=1e-3)
    assert res.converged and abs(float(res.values[0]) / float(ref.values[0]) - 1) < 1e-3
    for tol in (1e-4, 1e-5):  # below what fp32 fd can promise: converged only where the value is right
        res = lambda_max(params, lf, chunks, mode="fd", tol=tol)
        error = abs(float(res.values[0]) / float(ref.values[0]) - 1)
        assert error <= float(res.errors[0]) and (error < tol or not res.converged)
    fd = HessianOperator(params, lf, chunks, mode="fd")
    step = float(g @ fd.matvec(g) / (g @ g))
    assert abs(step / float(g @ cache.matvec(g) / (g @ g)) - 1) < 1e-3


def test_fd_error_bound_refuses_convergence_when_the_step_is_too_large(trained_neox_fp32):
    model, params, lf, chunks = trained_neox_fp32
    truth = float(lambda_max(params, lf, chunks, tol=1e-6).values[0])
    fd = HessianOperator(params, lf, chunks, mode="fd", fd_step=0.3)
    res = top_eigenvalues(fd, k=1, tol=1e-3)
    error = abs(float(res.values[0]) - truth) / truth
    assert error > 1e-3  # far off at this step ...
    assert not res.converged and float(res.errors[0]) >= error  # ... and it says so


def test_fd_matches_the_dense_hessian_of_a_small_fp32_net():
    model, params, loss_fn, chunks = mlp_problem(dtype=torch.float32)
    truth = dense_hessian(model, params, loss_fn, chunks).double()
    evals = torch.linalg.eigvalsh(truth).flip(0)
    res = lambda_max(params, loss_fn, chunks, k=2, tol=1e-4, mode="fd", max_hvps=200)
    assert res.converged
    torch.testing.assert_close(res.values, evals[:2], rtol=1e-4, atol=0)

"""Every public probe function leaves params, .grad, optimizer state, the global RNGs and train/eval flags as they
were, also when called directly (not through the Prober) on a model with dropout in train mode."""
import dataclasses
import random

import numpy as np
import pytest
import torch

import probes
from probes import (HessianOperator, ProbeConfig, ProbeContext, Prober, adam_preconditioner, adam_sharpness,
                    alignment, batch_sharpness, critical_sharpness, block_lambda_max, block_operator, hutchinson_trace, lambda_max,
                    parameter_blocks, preconditioned_operator, rayleigh_pair, rayleigh_quotient, stability_thresholds,
                    step_sharpness, top_eigenvalues, update_sharpness)

D = torch.float64


def dropout_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    model = model.to(D).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 4, generator=g, dtype=D)
    y = torch.sin(x.sum(1, keepdim=True))
    chunks = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]

    def loss_fn(c):
        return ((model(c[0]) - c[1]) ** 2).sum() / 48

    def sample_batch(gen):
        i = int(torch.randint(0, 3, (1,), generator=gen))
        return [(chunks[i][0], chunks[i][1] * 3)]  # a minibatch whose loss is the mean over its 16 points

    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        sum(loss_fn(c) for c in chunks).backward()
        opt.step()
    for p in params.values():  # a .grad that is not the probe loss's gradient
        p.grad = torch.full_like(p, 0.5)
    return model, params, loss_fn, chunks, sample_batch, opt


def snapshot(model, params, opt):
    return {
        "params": {n: p.detach().clone() for n, p in params.items()},
        "versions": {n: p._version for n, p in params.items()},
        "grads": {n: p.grad.clone() for n, p in params.items()},
        "opt": {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                for p, st in opt.state.items()},
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "python_rng": random.getstate(),
        "training": [m.training for m in model.modules()],
    }


def assert_same(a, b, what):
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"]), what
    assert a["versions"] == b["versions"], what
    assert all(torch.equal(a["grads"][n], b["grads"][n]) for n in a["grads"]), what
    assert a["opt"].keys() == b["opt"].keys(), what
    for key, st in a["opt"].items():
        for k, v in st.items():
            assert (torch.equal(v, b["opt"][key][k]) if torch.is_tensor(v) else v == b["opt"][key][k]), what
    assert torch.equal(a["torch_rng"], b["torch_rng"]), f"{what} advanced the torch RNG"
    assert np.array_equal(a["numpy_rng"], b["numpy_rng"]) and a["python_rng"] == b["python_rng"], what
    assert a["training"] == b["training"], what


def public_calls(model, params, loss_fn, chunks, sample_batch, opt):
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    op = lambda mode="cache": HessianOperator(params, loss_fn, chunks, mode=mode, model=model)  # noqa: E731
    dim = sum(p.numel() for p in params.values())
    v = torch.randn(dim, generator=gen(), dtype=D)
    update = {n: torch.full_like(p, 1e-3) for n, p in params.items()}
    blocks = parameter_blocks(list(params), [p.numel() for p in params.values()])
    ctx = ProbeContext(params=params, loss_fn=loss_fn, batches=chunks, lr=1e-2, step=10, optimizer=opt, model=model,
                       sample_batch=sample_batch, update=update)
    prober_cfg = dict(every=10, batch_sharpness_every=10, trace_every=10, blocks_every=10, batch_min_samples=2,
                      batch_max_samples=4, trace_max_probes=8, gni=True)
    calls = {f"HessianOperator[{m}].matvec": (lambda m=m: op(m).matvec(v)) for m in probes.hvp.MODES}
    calls.update({f"HessianOperator[{m}].gradient": (lambda m=m: op(m).gradient()) for m in probes.hvp.MODES})
    calls.update({f"lambda_max[{m}]": (lambda m=m: lambda_max(params, loss_fn, chunks, mode=m, model=model, k=2))
                  for m in probes.hvp.MODES})
    calls.update({
        "HessianOperator.dense": lambda: op().dense(),
        "lambda_max[init=gradient]": lambda: lambda_max(params, loss_fn, chunks, init="gradient", model=model),
        "top_eigenvalues": lambda: top_eigenvalues(op(), k=1),
        "rayleigh_pair": lambda: rayleigh_pair(op(), v),
        "rayleigh_quotient": lambda: rayleigh_quotient(op("fd"), v),
        "step_sharpness": lambda: step_sharpness(op("recompute")),
        "update_sharpness": lambda: update_sharpness(op(), update),
        "batch_sharpness": lambda: batch_sharpness(params, loss_fn, sample_batch, gen(), min_samples=2,
                                                   max_samples=3, model=model, full_op=op()),
        "adam_preconditioner": lambda: adam_preconditioner(opt, params, 1e-2),
        "preconditioned_operator": lambda: preconditioned_operator(op(), adam_preconditioner(opt, params, 1e-2))
        .matvec(v),
        "adam_sharpness": lambda: adam_sharpness(op(), opt, 1e-2),
        "stability_thresholds": lambda: stability_thresholds(opt, 1e-2),
        "hutchinson_trace": lambda: hutchinson_trace(op(), gen(), max_probes=4, min_probes=2, blocks=blocks),
        "block_lambda_max": lambda: block_lambda_max(op(), blocks),
        "block_operator": lambda: block_operator(op(), next(iter(blocks.values()))).matvec(
            torch.ones(int(next(iter(blocks.values())).numel()), dtype=D)),
        "Prober[train mode]": lambda: Prober(ProbeConfig(eval_mode=False, **prober_cfg))(ctx),
        "Prober[eval mode]": lambda: Prober(ProbeConfig(**prober_cfg))(ctx),
        "Prober[probe set]": lambda: Prober(ProbeConfig(eval_mode=False, **prober_cfg))(
            dataclasses.replace(ctx, batches=chunks[:1], probe_set=chunks)),
        "alignment": lambda: alignment(op(), v),
        "critical_sharpness": lambda: critical_sharpness(params, loss_fn, chunks, update, 1e-2),
        "critical_sharpness[from current]": lambda: critical_sharpness(params, loss_fn, chunks, update, 1e-2,
                                                                       from_previous=False),
    })
    return calls


CALL_NAMES = list(public_calls(*dropout_problem()))


@pytest.mark.parametrize("name", CALL_NAMES)
def test_public_probe_function_has_no_side_effects(name):
    model, params, loss_fn, chunks, sample_batch, opt = dropout_problem()
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = snapshot(model, params, opt)
    public_calls(model, params, loss_fn, chunks, sample_batch, opt)[name]()
    assert_same(before, snapshot(model, params, opt), name)


def test_dropout_model_in_train_mode_gives_one_fixed_operator():
    # every pass runs from the RNG state at construction: the same dropout masks in every mode and HVP
    model, params, loss_fn, chunks, _, _ = dropout_problem()
    ops = {m: HessianOperator(params, loss_fn, chunks, mode=m) for m in probes.hvp.MODES}
    v = torch.randn(ops["cache"].dim, generator=torch.Generator().manual_seed(0), dtype=D)
    hv = ops["cache"].matvec(v)
    torch.testing.assert_close(ops["cache"].matvec(v), hv, rtol=0, atol=0)
    torch.testing.assert_close(ops["recompute"].matvec(v), hv, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ops["fd"].matvec(v), hv, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(ops["recompute"].gradient(), ops["cache"].gradient(), rtol=1e-12, atol=1e-15)

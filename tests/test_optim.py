import pytest
import torch

from agents.optim import (OptimConfig, accumulate_gradients, build_optimizer, build_scheduler, config_errors,
                          lr_multiplier, split)


def _param(values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


def test_sgd_momentum_matches_heavy_ball_by_hand():
    p = _param([1.0, -2.0])
    opt = build_optimizer([p], OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.01))
    assert isinstance(opt, torch.optim.SGD)
    theta, buf = p.detach().clone(), None
    for _ in range(3):
        opt.zero_grad()
        (p ** 2).sum().backward()          # g = 2θ
        opt.step()
        g = 2 * theta + 0.01 * theta          # L2 weight decay added to the gradient
        buf = g if buf is None else 0.9 * buf + g
        theta = theta - 0.1 * buf
        assert torch.allclose(p.detach(), theta, rtol=0, atol=1e-12)


def test_plain_sgd_and_nesterov_and_adam_variants():
    p = _param([3.0])
    opt = build_optimizer([p], OptimConfig(name="sgd", lr=0.5, momentum=0.0, weight_decay=0.0))
    (p ** 2).sum().backward()
    opt.step()
    assert p.item() == pytest.approx(3.0 - 0.5 * 6.0)
    nest = build_optimizer([_param([1.0])], OptimConfig(momentum=0.9, nesterov=True))
    assert nest.param_groups[0]["nesterov"] is True
    adam = build_optimizer([_param([1.0])], OptimConfig(name="adam", lr=1e-3, betas=(0.8, 0.99), eps=1e-6))
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["betas"] == (0.8, 0.99)
    adamw = build_optimizer([_param([1.0])], OptimConfig(name="adamw", weight_decay=0.1))
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["weight_decay"] == 0.1
    # Adam's first step moves every coordinate by lr (bias-corrected m/sqrt(v) = sign(g)).
    q = _param([5.0, -7.0])
    adam = build_optimizer([q], OptimConfig(name="adam", lr=0.01, weight_decay=0.0))
    (q ** 3).sum().backward()
    adam.step()
    assert torch.allclose(q.detach(), torch.tensor([4.99, -7.01], dtype=torch.float64), atol=1e-7)


@pytest.mark.parametrize("bad, fragment", [
    (OptimConfig(name="lion"), "optim.name"),
    (OptimConfig(lr=0.0), "optim.lr"),
    (OptimConfig(lr=float("nan")), "optim.lr"),
    (OptimConfig(momentum=1.0), "momentum"),
    (OptimConfig(name="adam", nesterov=True), "nesterov"),
    (OptimConfig(weight_decay=-1), "weight_decay"),
    (OptimConfig(betas=(0.9, 1.0)), "betas"),
    (OptimConfig(schedule="step"), "schedule"),
    (OptimConfig(grad_clip=0.0), "grad_clip"),
])
def test_config_errors_name_the_field(bad, fragment):
    errors = config_errors(bad)
    assert len(errors) == 1 and fragment in errors[0]
    with pytest.raises(ValueError, match=fragment):
        build_optimizer([_param([1.0])], bad)


def test_default_config_is_valid():
    assert config_errors(OptimConfig()) == []


def test_schedules():
    const = lr_multiplier(OptimConfig(), total_steps=10)
    assert [const(s) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    lin = lr_multiplier(OptimConfig(schedule="linear"), total_steps=10)
    assert [lin(s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    cos = lr_multiplier(OptimConfig(schedule="cosine", warmup_steps=2), total_steps=12)
    assert [cos(0), cos(1)] == [0.5, 1.0]
    assert cos(2) == 1.0 and cos(7) == pytest.approx(0.5) and cos(12) == pytest.approx(0.0)
    p = _param([1.0])
    opt = build_optimizer([p], OptimConfig(lr=0.2, schedule="linear"))
    sched = build_scheduler(opt, OptimConfig(lr=0.2, schedule="linear"), total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.15, 0.1, 0.05])


def test_accumulated_gradient_equals_one_shot_token_mean_gradient():
    """Chunks of unequal token counts, each normalised by the batch total, reproduce the one-shot gradient;
    the naive mean of per-chunk means does not (so the test can fail)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    x = torch.randn(11, 5, dtype=torch.float64)
    y = torch.randn(11, dtype=torch.float64)
    full = ((x @ w - y) ** 2).mean()
    (g_full,) = torch.autograd.grad(full, w)
    chunks = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 11, 4)]  # sizes 4, 4, 3
    n = 11

    w.grad = None
    loss, stats = accumulate_gradients(lambda c: (((c[0] @ w - c[1]) ** 2).sum() / n, {"rows": len(c[1]) / n}),
                                       chunks)
    assert torch.allclose(w.grad, g_full, rtol=1e-12, atol=1e-14)
    assert loss.item() == pytest.approx(full.item(), rel=1e-12)
    assert stats == {"rows": pytest.approx(1.0)}

    w.grad = None
    accumulate_gradients(lambda c: ((c[0] @ w - c[1]) ** 2).mean() / len(chunks), chunks)
    assert not torch.allclose(w.grad, g_full, rtol=1e-6)


def test_split():
    assert split(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError):
        split([1], 0)
    assert sum(len(s) for s in split(list(range(100)), 7)) == 100

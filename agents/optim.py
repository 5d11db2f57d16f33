"""Optimizers, learning-rate schedules and exact gradient accumulation.

The optimizers are torch's own (``torch.optim.SGD`` / ``Adam`` / ``AdamW``); this module only maps a frozen config
onto them. Schedules are ``LambdaLR`` multipliers and default to a constant LR, because Edge-of-Stability analysis
compares λ_max against 2/η and a moving η blurs that threshold.

Accumulation contract (shared with the probes). An effective batch is a list of *chunks* (micro-batches). Each
regime builds every chunk with the denominator of the whole effective batch, so that

    L(batch) = Σ_c L_c,   L_c = Σ_{tokens t in c} ℓ_t / N_batch,

where N_batch is the number of loss tokens in the effective batch (token-mean CE for SFT, token-mean surrogate for
PPO). Hence ``Σ_c ∇L_c = ∇L(batch)`` exactly: accumulation is not an approximation of the one-shot gradient, and
full-batch gradient descent over a fixed dataset is simply "one effective batch = the whole dataset". The probes
receive the same chunks and the same ``loss_fn``, so they measure the very loss the optimizer steps on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from agents.eos_lr import CONTROLLED, ControlConfig, control_errors

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine", *CONTROLLED)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters.

    ``name="sgd"`` with ``momentum=0`` is plain (stochastic or full-batch) gradient descent; ``momentum>0`` is
    heavy-ball, stable up to λ_max = (2 + 2β)/η (Nesterov with ``nesterov=True``: (2 + 2β)/((1 + 2β)η); see
    probes.thresholds). ``weight_decay`` is L2 added to the gradient for SGD/Adam and decoupled for AdamW (torch
    semantics). ``schedule`` multiplies ``lr`` by 1 (constant), a linear decay to 0, or a cosine decay to 0 over the
    run, after ``warmup_steps`` of linear warm-up; ``eos`` and ``cdat`` instead set η from a curvature estimate
    during the run, starting from ``lr`` (agents.eos_lr, knobs in ``control``).
    ``grad_clip`` clips the global gradient L2 norm (None = off).
    """

    name: str = "sgd"
    """sgd, adam or adamw (torch.optim)."""
    lr: float = 1e-2
    """Learning rate η (the peak LR under a schedule)."""
    momentum: float = 0.9
    """SGD heavy-ball momentum β (0 = plain gradient descent); ignored by Adam/AdamW."""
    weight_decay: float = 1e-4
    """L2 added to the gradient (SGD, Adam) or decoupled decay (AdamW)."""
    nesterov: bool = False
    """SGD: Nesterov momentum instead of heavy-ball."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW (β1, β2)."""
    eps: float = 1e-8
    """Adam/AdamW denominator ε."""
    schedule: str = "constant"
    """LR multiplier after warm-up: constant, linear (to 0) or cosine (to 0) over the run; or eos (η held at
    control.target × the stability threshold by a sharpness estimate) or cdat (Roulet et al. 2024), from lr."""
    warmup_steps: int = 0
    """Steps of linear LR warm-up from 0 (constant, linear, cosine only)."""
    control: ControlConfig = field(default_factory=ControlConfig)
    """Knobs of the eos and cdat schedules."""
    grad_clip: float | None = None
    """Clip the global gradient L2 norm to this (None = off)."""


def config_errors(cfg: OptimConfig) -> list[str]:
    """Human-readable problems with ``cfg`` (empty list = valid). Comparisons are written so that NaN fails them."""
    errors = []
    if cfg.name not in OPTIMIZERS:
        errors.append(f"optim.name={cfg.name!r} is unknown; choose one of {OPTIMIZERS}")
    if not (isinstance(cfg.lr, (int, float)) and math.isfinite(cfg.lr) and cfg.lr > 0):
        errors.append(f"optim.lr={cfg.lr!r} must be a finite number > 0")
    if not 0 <= cfg.momentum < 1:
        errors.append(f"optim.momentum={cfg.momentum} must be in [0, 1)")
    if cfg.nesterov and (cfg.name != "sgd" or cfg.momentum == 0):
        errors.append("optim.nesterov=True needs name='sgd' and momentum > 0")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        errors.append(f"optim.weight_decay={cfg.weight_decay} must be a finite number >= 0")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        errors.append(f"optim.betas={cfg.betas} must be two numbers in [0, 1)")
    if not (math.isfinite(cfg.eps) and cfg.eps > 0):
        errors.append(f"optim.eps={cfg.eps} must be a finite number > 0")
    if cfg.schedule not in SCHEDULES:
        errors.append(f"optim.schedule={cfg.schedule!r} is unknown; choose one of {SCHEDULES}")
    if cfg.warmup_steps < 0:
        errors.append(f"optim.warmup_steps={cfg.warmup_steps} must be >= 0")
    if cfg.schedule in CONTROLLED:
        if cfg.warmup_steps:
            errors.append(f"optim.warmup_steps={cfg.warmup_steps} must be 0 with schedule={cfg.schedule!r}, which "
                          "sets η itself (its bounded changes from optim.lr are its warm-up)")
        errors += control_errors(cfg.control)
    if cfg.grad_clip is not None and not (math.isfinite(cfg.grad_clip) and cfg.grad_clip > 0):
        errors.append(f"optim.grad_clip={cfg.grad_clip} must be a finite number > 0, or None")
    return errors


def build_optimizer(params: Iterable[torch.Tensor] | Iterable[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch optimizer for ``params`` (tensors or param-group dicts) as configured by ``cfg``."""
    errors = config_errors(cfg)
    if errors:
        raise ValueError("; ".join(errors))
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Step -> LR multiplier: linear warm-up over ``warmup_steps``, then constant / linear / cosine decay to 0."""
    warm, total = cfg.warmup_steps, max(1, total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant" or cfg.schedule in CONTROLLED:  # a controller, not this, moves η
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if cfg.schedule == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """``LambdaLR`` with :func:`lr_multiplier`; call ``.step()`` once per optimizer step. None for the schedules
    that set η during the run (eos, cdat: :func:`agents.eos_lr.build_controller`)."""
    if cfg.schedule in CONTROLLED:
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps))


def accumulate_gradients(loss_fn: Callable[[Any], Any], chunks: Sequence[Any],
                         scale: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """Backpropagate every chunk loss into ``.grad``; return the summed (effective-batch) loss, detached, and the
    summed stats. ``scale`` (e.g. ``GradScaler.scale``) maps a loss to what is backpropagated (float16 training);
    the returned loss is unscaled.

    ``loss_fn(chunk)`` returns the chunk loss, or ``(loss, stats)`` with float stats normalised like the loss
    (so their sum over chunks is the batch value). Cost: one forward + backward per chunk; memory of one chunk.
    Because chunk losses are normalised by the effective batch's token count (see module docstring), the
    accumulated ``.grad`` equals the gradient of the one-shot batch loss. Callers zero the gradients first.
    """
    total = torch.zeros((), dtype=torch.float64)
    stats: dict[str, float] = {}
    for chunk in chunks:
        out = loss_fn(chunk)
        loss, chunk_stats = out if isinstance(out, tuple) else (out, {})
        (scale(loss) if scale is not None else loss).backward()
        total = total + loss.detach().double()
        for k, v in chunk_stats.items():
            stats[k] = stats.get(k, 0.0) + float(v)
    return total, stats


def split(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Consecutive slices of ``items`` of length ``size`` (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]

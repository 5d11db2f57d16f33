"""Stability thresholds: the sharpness above which an optimizer's iteration diverges on a quadratic.

On f(x) = ½λx² each optimizer below is a linear recurrence in x, stable iff every root of its characteristic
polynomial lies inside the unit circle; as λ grows a root leaves through z = −1, and that λ is the threshold
(ηλ at it is the optimizer's "edge"). Notation of ``torch.optim.SGD``: momentum β, dampening τ, buffer
b ← βb + (1 − τ)g; a = ηλ.
- GD, x ← x − ηg: root 1 − a, so λ < 2/η (Cohen et al. 2021, arXiv 2103.00065).
- heavy ball, x ← x − ηb: z² − (1 + β − (1 − τ)a)z + β; z = −1 gives λ < (2 + 2β)/((1 − τ)η)
  (no threshold at τ = 1, where the buffer forgets the gradient after the first step).
- Nesterov, x ← x − η(g + βb): z² − (1 + β − (1 + (1 − τ)β)a)z + β(1 − a); z = −1 gives
  λ < (2 + 2β)/((1 + (2 − τ)β)η), i.e. (2 + 2β)/((1 + 2β)η) at τ = 0 (torch allows Nesterov only there).
  The other root conditions hold below it for 0 ≤ β < 1, 0 ≤ τ ≤ 1, the domain of every formula here.
- Adam/AdamW on the preconditioned sharpness λ₁(P⁻¹H) (Cohen et al. 2022, arXiv 2207.14484): with P frozen,
  m ← β₁m + (1 − β₁)g, x ← x − ηP⁻¹m is heavy ball with β = τ = β₁, so λ₁(P⁻¹H) < (2 + 2β₁)/((1 − β₁)η).

Imports nothing (no torch), so run-dir readers use the same formulas as the probes.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["gd_threshold", "momentum_threshold", "adam_threshold", "thresholds", "stability_thresholds"]


def _check_lr(lr: float) -> None:
    if not lr > 0:
        raise ValueError(f"probes: lr must be positive, got {lr}")


def gd_threshold(lr: float) -> float:
    """2/η."""
    _check_lr(lr)
    return 2.0 / lr


def momentum_threshold(lr: float, momentum: float, dampening: float = 0.0, nesterov: bool = False) -> float:
    """(2 + 2β)/((1 − τ)η) for heavy ball, (2 + 2β)/((1 + (2 − τ)β)η) for Nesterov; 2/η at β = 0; inf for heavy
    ball at τ = 1."""
    _check_lr(lr)
    if momentum == 0:   # torch ignores dampening and nesterov without momentum: plain GD
        return gd_threshold(lr)
    if nesterov:
        return (2 + 2 * momentum) / lr / (1 + (2 - dampening) * momentum)
    if dampening == 1:
        return math.inf
    return (2 + 2 * momentum) / ((1 - dampening) * lr)


def adam_threshold(lr: float, beta1: float) -> float:
    """(2 + 2β₁)/((1 − β₁)η), the threshold of the preconditioned sharpness λ₁(P⁻¹H)."""
    _check_lr(lr)
    return (2 + 2 * beta1) / ((1 - beta1) * lr)


def thresholds(lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
               beta1: float | None = None) -> dict[str, float]:
    """The thresholds that apply to one optimizer, under their metric names (without ``probe/``): always
    ``two_over_eta``; ``adam_threshold`` when ``beta1`` is given (Adam family); else ``momentum_threshold`` when
    momentum > 0."""
    out = {"two_over_eta": gd_threshold(lr)}
    if beta1 is not None:
        out["adam_threshold"] = adam_threshold(lr, beta1)
    elif momentum > 0:
        out["momentum_threshold"] = momentum_threshold(lr, momentum, dampening, nesterov)
    return out


def stability_thresholds(optimizer: Any, lr: float) -> dict[str, float]:
    """:func:`thresholds` for a torch optimizer's first param group (``betas`` marks the Adam family; momentum,
    dampening and nesterov as in SGD), at η = ``lr``. No HVPs; reads only ``optimizer.param_groups``."""
    _check_lr(lr)
    if optimizer is None or not optimizer.param_groups:
        return thresholds(lr)
    group = optimizer.param_groups[0]
    if "betas" in group:
        return thresholds(lr, beta1=float(group["betas"][0]))
    return thresholds(lr, momentum=float(group.get("momentum", 0.0) or 0.0),
                      dampening=float(group.get("dampening", 0.0) or 0.0), nesterov=bool(group.get("nesterov", False)))

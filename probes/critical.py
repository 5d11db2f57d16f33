"""Critical sharpness (Kalra et al. 2026, arXiv 2601.16979): λc = 2/ηc, where ηc is the smallest step size along
an update direction at which the loss rises above its value at the start of the step. Forward passes only.

Along the line θ(s) = θ₀ + s·Δθ, with Δθ the update the optimizer took from θ₀ at learning rate η (s = 1 is the
step itself), f(s) = L(θ(s)) and ηc = s_c·η with s_c = min{s > 0 : f(s) > f(0)}. Units: λc is in 1/η, like λ_max
and 2/η, and λc > 2/η ⟺ s_c < 1 ⟺ the step taken raised the loss.
On a quadratic L = ½θᵀAθ − bᵀθ with Δθ = −ηg: f(s) − f(0) = −sη gᵀg + ½s²η² gᵀAg, so ηc = 2gᵀg/gᵀAg and
λc = gᵀAg/gᵀg, the Rayleigh quotient of the gradient (≤ λ_max; it approaches λ_max as g aligns with the top
eigenvector, as at the edge of stability).

Search (forward passes of the probed examples, each ≈ ⅓ of a gradient; :func:`critical_step`): cold, f(0), f(1),
then doubling while f stays ≤ f(0), or, when f(1) already rises, f(½) and then a jump to the floor 2^-(max − 2)
(1/256 at the default 10 passes: as far as halving would reach), geometric
bisection down to a factor-2 bracket and bisection until the bracket's width is at most 2·rtol of its midpoint:
2 + (1 per factor of 2 between 1 and s_c ≥ ½) + 1–2 passes at rtol 0.15 (2–3 at 0.05); for s_c < ½ about 4 + 3 +
1–2; 4 when the update raises the loss at every step down to the floor (NaN: the update is uphill for the probed
examples). Warm from the previous ηc: 3 passes when ηc moved less than rtol, else about one more than cold.
Replayed on the ηc trajectories of the LM runs of ``sweep adaptive_lr`` and a default LoRA run (where 37 of 99
calls were uphill), this costs 5.3–5.5 passes a call at rtol 0.15, against 6.2–7.5 for halving all the way down
(tests/test_probes_traces.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from .hvp import REDUCE_DTYPE, as_named_params, fixed_rng, rng_state

__all__ = ["CriticalSharpness", "critical_step", "critical_sharpness"]


@dataclass
class CriticalSharpness:
    value: float       # λc = 2/ηc (NaN when ηc was not bracketed)
    eta: float         # ηc = s_c·η
    step: float        # s_c, in units of the update Δθ (s = 1: the step taken)
    forwards: int      # forward passes over the loss's chunks
    loss0: float       # f(0), the loss at the start of the line


def critical_step(f: Callable[[float], float], rtol: float = 0.05, max_evals: int = 20,
                  guess: float | None = None) -> tuple[float, int, float]:
    """(s_c, evaluations, f(0)) for s_c = min{s > 0 : f(s) > f(0)}, by bracketing and bisection.

    The first trial is s₁ = 1 (cold, ``guess`` None) or, warm (``guess`` = a previous s_c), the final bracket
    guess·[1 − rtol, 1 + rtol] itself, so an s_c that moved less than rtol costs 3 evaluations. Until f rises the
    bracket grows upwards by factors of 2. When the first trial already rises, it tries s/2 (s_c is usually close),
    then jumps to the floor s₁/2^(max_evals − 2), as far as halving within the budget would reach: if f rises
    there too, f rises at every step tried (an uphill direction, common when the probed examples are not the batch
    that made the update) and the search stops (NaN) after 4 evaluations instead of halving its way down. A bracket
    [lo, hi] wider than a factor 2 is then cut at its geometric midpoint, and finally at its midpoint until
    hi − lo ≤ 2·rtol·(lo + hi)/2. s_c is the midpoint of that bracket (f(lo) ≤ f(0) < f(hi)), so its relative error
    is ≤ rtol (coarser where ``max_evals`` ends the bisection). NaN when no bracket is found within ``max_evals``:
    f rises at every step tried (the direction is not a descent direction of f) or never rises."""
    warm = guess is not None and math.isfinite(guess) and guess > 0
    f0 = f(0.0)
    lo, hi = None, None
    n = 1
    trials = (guess * (1 - rtol), guess * (1 + rtol)) if warm else (1.0,)
    for s in trials:
        n += 1
        if f(s) > f0:
            hi = s
            break
        lo = s
    # while every try rises: s₁/2, then the floor s₁/2^(max_evals − 2) (one try when they coincide)
    down = iter(sorted({trials[0] / 2, trials[0] / 2.0 ** max(max_evals - 2, 1)}, reverse=True))
    while (lo is None or hi is None) and n < max_evals:
        if lo is None:
            s = next(down, None)
            if s is None:
                break
        else:                                 # none rises: double
            s = s * 2
        n += 1
        if f(s) > f0:
            hi = s
        else:
            lo = s
    if lo is None or hi is None:
        return math.nan, n, f0
    while hi > 2 * lo and n < max_evals:      # a wide bracket (after the jump): geometric bisection
        mid = math.sqrt(lo * hi)
        n += 1
        if f(mid) > f0:
            hi = mid
        else:
            lo = mid
    while hi - lo > rtol * (hi + lo) * (1 + 1e-9) and n < max_evals:   # width ≤ 2·rtol·midpoint (+ rounding)
        mid = (lo + hi) / 2
        n += 1
        if f(mid) > f0:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2, n, f0


def critical_sharpness(params: Mapping[str, torch.Tensor], loss_fn: Callable[[Any], torch.Tensor],
                       batches: Sequence[Any], update: Mapping[str, torch.Tensor], lr: float, *,
                       from_previous: bool = True, rtol: float = 0.05, max_forwards: int = 20,
                       eta_guess: float | None = None) -> CriticalSharpness:
    """λc = 2/ηc of f(s) = Σ_c loss_fn(batches[c]) at θ₀ + s·Δθ, Δθ = ``update`` taken at learning rate ``lr``.

    ``from_previous``: the update was already applied (θ = θ₀ + Δθ, as in a trainer that probes after stepping),
    so the line starts at θ₀ = θ − Δθ, the point the optimizer stepped from, where Δθ is a descent direction;
    False: it starts at the current θ. ``eta_guess``: a previous ηc, which warm-starts the bracket (3 passes when ηc
    moved less than rtol). Forward passes only (``forwards`` ≤ ``max_forwards``), under no_grad.

    No side effects: the trial points are written through ``.data`` (no ``_version`` bump) and θ is restored bit for
    bit from a copy (adding and subtracting s·Δθ would not be exact in floating point); every pass runs from the
    RNG state at entry (fixed dropout masks) and the caller's RNG state is restored."""
    named = as_named_params(params)
    plist = list(named.values())
    missing = [n for n in named if n not in update]
    if missing:
        raise ValueError(f"probes: update lacks parameters {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if lr <= 0:
        raise ValueError(f"probes: critical sharpness needs the update's learning rate > 0, got {lr}")
    delta = [update[n].detach().to(device=p.device, dtype=p.dtype) for n, p in named.items()]
    saved = [p.detach().clone() for p in plist]
    origin = [s - d for s, d in zip(saved, delta)] if from_previous else saved
    rng = rng_state()

    def f(s: float) -> float:
        with torch.no_grad():
            for p, o, d in zip(plist, origin, delta):
                p.data.copy_(o if s == 0.0 else o + s * d)
            with fixed_rng(rng):
                return float(sum(loss_fn(c).detach().to(REDUCE_DTYPE) for c in batches))

    try:
        s_c, n, f0 = critical_step(f, rtol=rtol, max_evals=max_forwards,
                                   guess=None if eta_guess is None else eta_guess / lr)
    finally:
        with torch.no_grad():
            for p, s in zip(plist, saved):
                p.data.copy_(s)
    eta = s_c * lr
    return CriticalSharpness(2.0 / eta if eta > 0 else math.nan, eta, s_c, n, f0)

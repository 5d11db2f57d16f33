"""Curvature measurements built on :class:`HessianOperator` and :func:`top_eigenvalues`.

Costs are in HVPs of the probe-batch operator unless stated; G = one probe-batch gradient (an HVP ≈ 1.6 G cached).
- λ_max: largest algebraic eigenvalue of H (Cohen et al. 2021, EoS), warm-started LOBPCG.
- step / update sharpness: ρ(u) = uᵀHu / uᵀu for u = the probe-batch gradient or the optimizer update Δθ (1 HVP).
- warm Rayleigh quotient ρ(v) on a stored top eigenvector v (1 HVP) and its alignment |cos(v, g)| with the
  gradient (0 HVPs): cheap traces between eigen-solves. Critical sharpness (forward passes only): probes.critical.
- batch sharpness (Andreyev & Beneventano, arXiv 2412.20553): E_B[g_BᵀH_B g_B] / E_B[‖g_B‖²] (ratio of means) and
  E_B[g_BᵀH_B g_B / ‖g_B‖²] (mean of ratios), Monte Carlo over fresh minibatches (≈2.8 G_b per draw).
- GNI (same paper): E_B[g_Bᵀ H g_B] / ‖∇L‖², H and ∇L of the probe batch (1 extra HVP per draw).
- Adam/AdamW preconditioned sharpness (Cohen et al. 2022, arXiv 2207.14484): λ₁(P^-½ H P^-½) with
  P = (1 − β₁ᵗ)(√(v/(1 − β₂ᵗ)) + ε), against (2 + 2β₁)/((1 − β₁)η). Decoupled weight decay adds ηλ·I to the update
  Jacobian outside the preconditioner and is not included.
- the thresholds these are compared with (2/η, momentum, Adam) are in :mod:`probes.thresholds`.
- Hutchinson trace E_z[zᵀHz] with Rademacher z; per-block traces tr(H_bb) = E[z_bᵀ(Hz)_b] from the same HVPs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Callable, Mapping, Sequence

import torch

from .blocks import block_operator
from .eigs import EigResult, dot64, top_eigenvalues, work_dtype
from .hvp import REDUCE_DTYPE, HessianOperator, LinearOperator

__all__ = [
    "lambda_max", "rayleigh_quotient", "rayleigh_pair", "step_pair", "step_sharpness", "update_pair",
    "update_sharpness", "flat_update", "alignment", "ESTIMATORS",
    "BatchSharpness", "batch_sharpness", "adam_preconditioner", "preconditioned_operator", "adam_sharpness",
    "TraceEstimate", "hutchinson_trace", "block_lambda_max", "t_quantile",
]


# ---- eigenvalues -------------------------------------------------------------------------------------------
def lambda_max(params, loss_fn: Callable[[Any], torch.Tensor], batches: Sequence[Any], k: int = 1,
               tol: float = 1e-3, mode: str = "cache", init: torch.Tensor | str | None = None,
               max_hvps: int | None = None, model: torch.nn.Module | None = None,
               generator: torch.Generator | None = None, stop: str = "residual") -> EigResult:
    """Top-k eigenpairs of the Hessian of Σ_c loss_fn(batches[c]) over ``params`` (see :func:`top_eigenvalues`).

    ``init``: warm-start vectors, None (random), or ``"gradient"``: start from the probe-batch gradient g (free
    from the cached graph, 1 G in the other modes). The top eigenvectors dominate g in training (Gur-Ari et al.
    2018), which saves about one HVP cold (experiments/bench/probe_speed.py), but it is not the default: a g that
    lies in an invariant subspace missing the top eigenvector (a symmetric toy problem, θ on an eigenvector of a
    quadratic) converges to the wrong eigenvalue, which a random start avoids with probability one. A zero
    gradient falls back to a random start.
    """
    if isinstance(init, str) and init != "gradient":
        raise ValueError(f"probes: init must be a tensor, None or 'gradient', got {init!r}")
    op = HessianOperator(params, loss_fn, batches, mode=mode, model=model)
    try:
        if isinstance(init, str):
            g = op.gradient()
            init = g if bool(g.any()) else None
        return top_eigenvalues(op, k=k, tol=tol, init=init, max_hvps=max_hvps, generator=generator, stop=stop)
    finally:
        op.release()


def rayleigh_pair(op, u: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(uᵀHu / uᵀu, u, Hu) with u and Hu in the operator's dtype and both products accumulated in float64 (1 HVP;
    NaN and no HVP for u = 0). The pair (u, Hu) can seed an eigen-solve through ``top_eigenvalues(known=...)``."""
    u = u.to(device=op.device, dtype=work_dtype(op))
    uu = dot64(u)
    if uu == 0.0:
        return math.nan, u, torch.zeros_like(u)
    hu = op.matvec(u)
    return dot64(u, hu) / uu, u, hu


def rayleigh_quotient(op, u: torch.Tensor) -> float:
    """uᵀHu / uᵀu (1 HVP); NaN for u = 0."""
    return rayleigh_pair(op, u)[0]


def alignment(op: HessianOperator, v: torch.Tensor) -> float:
    """|vᵀg| / (‖v‖‖g‖) for g the operator's gradient: how much of the gradient lies along v (e.g. the top
    eigenvector). 0 HVPs; g is free from the cached graph (1 G in the other modes). NaN when v or g is 0."""
    g = op.gradient()
    v = v.to(device=op.device, dtype=g.dtype).reshape(-1)
    norms = math.sqrt(dot64(v) * dot64(g))
    return abs(dot64(v, g)) / norms if norms > 0 else math.nan


def step_pair(op: HessianOperator) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(gᵀHg / gᵀg, g, Hg) with g, H of the probe batch: step sharpness (EoSS, when it is the live batch) and the
    pair that can seed an eigen-solve. 1 HVP."""
    return rayleigh_pair(op, op.gradient())


def step_sharpness(op: HessianOperator) -> float:
    """gᵀHg / gᵀg with g, H of the probe batch (EoSS step sharpness when it is the live batch). 1 HVP."""
    return step_pair(op)[0]


def flat_update(update: Mapping[str, torch.Tensor], names: Sequence[str], dtype=REDUCE_DTYPE) -> torch.Tensor:
    """Flatten a name -> tensor update in the operator's parameter order, in ``dtype``."""
    missing = [n for n in names if n not in update]
    if missing:
        raise ValueError(f"probes: update lacks parameters {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return torch.cat([update[n].detach().to(dtype).reshape(-1) for n in names])


def update_pair(op: HessianOperator, update: Mapping[str, torch.Tensor] | torch.Tensor
                ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(ΔθᵀHΔθ / ΔθᵀΔθ, Δθ, HΔθ) for the optimizer's last update Δθ (name -> tensor, or flat). 1 HVP."""
    u = update if isinstance(update, torch.Tensor) else flat_update(update, op.names, work_dtype(op))
    return rayleigh_pair(op, u)


def update_sharpness(op: HessianOperator, update: Mapping[str, torch.Tensor] | torch.Tensor) -> float:
    """ΔθᵀHΔθ / ΔθᵀΔθ for the optimizer's last update Δθ. 1 HVP."""
    return update_pair(op, update)[0]


# ---- batch sharpness and GNI --------------------------------------------------------------------------------
def t_quantile(p: float, df: int) -> float:
    """Student-t quantile by the Cornish–Fisher expansion (Abramowitz & Stegun 26.7.5); error < 1e-3 for df ≥ 5,
    so no scipy dependency for a confidence interval."""
    z = NormalDist().inv_cdf(p)
    if df <= 0:
        raise ValueError("probes: degrees of freedom must be positive")
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def _ratio_of_means_se(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """R = ā / b̄ and its delta-method standard error √((s_a² − 2R s_ab + R² s_b²) / n) / b̄."""
    n = a.numel()
    if float(b.mean()) == 0.0:   # every sampled gradient is zero (e.g. RL with equal rewards): R is undefined
        return math.nan, math.inf
    r = float(a.mean() / b.mean())
    if n < 2:
        return r, math.inf
    ca, cb = a - a.mean(), b - b.mean()
    var = float(((ca - r * cb) ** 2).sum()) / (n - 1)
    return r, math.sqrt(max(var, 0.0) / n) / abs(float(b.mean()))


def _ratios(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-draw Rayleigh quotients a_i / b_i of the draws with g_B ≠ 0: a zero gradient has no direction, hence no
    quotient (0/0 would make the whole mean NaN; the ratio of means already gives such draws zero weight)."""
    return a[b > 0] / b[b > 0]


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    n = x.numel()
    return float(x.mean()), (float(x.std()) / math.sqrt(n) if n > 1 else math.inf)


@dataclass
class BatchSharpness:
    ratio_of_means: float     # E[gᵀH_B g] / E[‖g‖²]
    rom_ci: tuple[float, float]
    mean_of_ratios: float     # E[gᵀH_B g / ‖g‖²]
    mor_ci: tuple[float, float]
    n: int                    # minibatches drawn
    rse: float                # relative standard error of the estimator named by ``estimator``
    estimator: str
    hvps: int
    gni: float = math.nan     # E[g_Bᵀ H g_B] / ‖∇L‖² when a full-batch operator was given
    gni_ci: tuple[float, float] = (math.nan, math.nan)
    samples: dict = field(default_factory=dict, repr=False)   # per-draw gHg, gg (and gHfull g)

    @property
    def value(self) -> float:
        return self.ratio_of_means if self.estimator == "ratio_of_means" else self.mean_of_ratios


ESTIMATORS = ("ratio_of_means", "mean_of_ratios")


def batch_sharpness(params, loss_fn: Callable[[Any], torch.Tensor],
                    sample_batch: Callable[[torch.Generator], Sequence[Any]], generator: torch.Generator, *,
                    min_samples: int = 20, max_samples: int = 200, rse: float = 0.01,
                    estimator: str = "ratio_of_means", confidence: float = 0.95, mode: str = "cache",
                    model: torch.nn.Module | None = None, full_op: HessianOperator | None = None,
                    cache_mb: float = 0.0) -> BatchSharpness:
    """Monte Carlo batch sharpness over minibatches drawn by ``sample_batch(generator)``.

    Each draw B builds the minibatch operator H_B, takes g_B (free with the cached graph) and g_BᵀH_B g_B (1 HVP);
    with ``full_op`` also g_Bᵀ H g_B for the GNI (1 more HVP). Stops after ``min_samples`` once the relative
    standard error of ``estimator`` (delta method for the ratio of means) is ≤ ``rse``, or at ``max_samples``.
    CIs are Student-t at ``confidence``.

    Both estimators average the per-draw Rayleigh quotients ρ_B = g_BᵀH_B g_B / ‖g_B‖² (the ratio of means weights
    them by ‖g_B‖²), so both lie in [min_B λ_min(H_B), max_B λ_max(H_B)]: a small ‖g_B‖² cannot push them outside
    the minibatch spectra. A large negative value beside a modest ``probe/lambda_max`` (the largest *algebraic*
    eigenvalue, blind to negative curvature) is strong negative curvature along g_B, e.g. in a run far above its edge.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"probes: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not 1 <= min_samples <= max_samples:
        raise ValueError(f"probes: need 1 <= min_samples <= max_samples, got {min_samples}, {max_samples}")
    ghg, gg, gfg = [], [], []
    hvps = 0
    grad_full_sq = dot64(full_op.gradient()) if full_op is not None else math.nan
    full_start = full_op.hvps if full_op is not None else 0
    rel = math.inf
    while len(gg) < max_samples:
        op = HessianOperator(params, loss_fn, sample_batch(generator), mode=mode, model=model, cache_mb=cache_mb)
        g = op.gradient()
        ghg.append(dot64(g, op.matvec(g)))
        gg.append(dot64(g))
        hvps += op.hvps
        op.release()
        if full_op is not None:
            gfg.append(dot64(g, full_op.matvec(g)))
        if len(gg) >= min_samples:
            if not any(gg):   # all gradients zero so far: undefined, and more draws of the same kind won't help
                break
            a, b = torch.tensor(ghg, dtype=REDUCE_DTYPE), torch.tensor(gg, dtype=REDUCE_DTYPE)
            value, se = _ratio_of_means_se(a, b) if estimator == "ratio_of_means" else _mean_se(_ratios(a, b))
            rel = se / abs(value) if value != 0 else math.inf
            if rel <= rse:
                break
    a, b = torch.tensor(ghg, dtype=REDUCE_DTYPE), torch.tensor(gg, dtype=REDUCE_DTYPE)
    n = len(gg)
    t = t_quantile(0.5 + confidence / 2, max(n - 1, 1))
    rom, rom_se = _ratio_of_means_se(a, b)
    mor, mor_se = _mean_se(_ratios(a, b))
    out = BatchSharpness(rom, (rom - t * rom_se, rom + t * rom_se), mor, (mor - t * mor_se, mor + t * mor_se),
                         n, rel, estimator, hvps, samples={"gHg": ghg, "gg": gg})
    if full_op is not None:
        c = torch.tensor(gfg, dtype=REDUCE_DTYPE) / grad_full_sq
        gni, gni_se = _mean_se(c)
        out.gni, out.gni_ci = gni, (gni - t * gni_se, gni + t * gni_se)
        out.hvps += full_op.hvps - full_start
        out.samples["gHfull_g"] = gfg
    if n == 1:
        out.rse = math.inf
    return out


# ---- the Adam preconditioner -------------------------------------------------------------------------------
def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                        lr: float, dtype=REDUCE_DTYPE) -> torch.Tensor | None:
    """Flat P = (1 − β₁ᵗ)(√(v/(1 − β₂ᵗ)) + ε) · η/η_g from Adam/AdamW state, so that the step is
    θ ← θ − η P⁻¹ m for every group g (per-group lr folded in against the reference η = ``lr``).
    None when the state is not there yet (before the first step). AMSGrad uses max_exp_avg_sq."""
    plist = list(params.values()) if isinstance(params, Mapping) else list(params)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    for p in plist:
        g = group_of.get(id(p))
        if g is None:
            raise ValueError("probes: a probed parameter is not in the optimizer's param groups")
        if "betas" not in g:
            raise ValueError("probes: adam_preconditioner needs an Adam-family optimizer (param group has no betas)")
        st = optimizer.state.get(p, {})
        v = st.get("max_exp_avg_sq" if g.get("amsgrad", False) else "exp_avg_sq")
        if v is None or "step" not in st:
            return None
        t = float(st["step"])
        b1, b2 = (float(b) for b in g["betas"])
        pre = (1 - b1 ** t) * ((v.detach().to(REDUCE_DTYPE) / (1 - b2 ** t)).sqrt() + float(g["eps"]))
        parts.append((pre * (lr / float(g["lr"]))).reshape(-1).to(dtype))   # float64 one parameter at a time
    return torch.cat(parts)


def preconditioned_operator(op, precond: torch.Tensor) -> LinearOperator:
    """v ↦ P^-½ H P^-½ v: symmetric, with the spectrum of P⁻¹H, as in Cohen et al. 2022 (P⁻¹H itself is not
    symmetric, and a symmetric eigen-solver on it is wrong). 1 HVP per application."""
    dtype = work_dtype(op)   # the solver's vectors stay in the operator's dtype
    inv_sqrt = precond.to(device=op.device, dtype=dtype).rsqrt()
    return LinearOperator(op.dim, lambda v: inv_sqrt * op.matvec(inv_sqrt * v), base=op,
                          error_gain=float(inv_sqrt.max()) ** 2, dtype=dtype)


def adam_sharpness(op: HessianOperator, optimizer: torch.optim.Optimizer, lr: float, k: int = 1,
                   tol: float = 1e-3, init: torch.Tensor | None = None, max_hvps: int | None = None,
                   generator: torch.Generator | None = None, stop: str = "residual") -> EigResult | None:
    """λ₁..λ_k of P^-½ H P^-½ (compare with :func:`probes.thresholds.adam_threshold`); None before Adam has
    state. Costs what :func:`top_eigenvalues` costs, one HVP per application."""
    precond = adam_preconditioner(optimizer, op.params, lr, work_dtype(op))
    if precond is None:
        return None
    pop = preconditioned_operator(op, precond)
    # P is not read again (the operator keeps P^-½), and ``init`` is read once by the solver: dropping them here
    # (popped into the call) frees two parameter-sized vectors for the solve
    handed = [init]
    del precond, init
    return top_eigenvalues(pop, k=k, tol=tol, init=handed.pop(), max_hvps=max_hvps, generator=generator, stop=stop)


# ---- trace and per-block quantities ------------------------------------------------------------------------
@dataclass
class TraceEstimate:
    trace: float
    se: float
    n: int
    hvps: int
    blocks: dict[str, float] = field(default_factory=dict)     # tr(H_bb)


def hutchinson_trace(op, generator: torch.Generator, max_probes: int = 64, min_probes: int = 8,
                     rse: float = 0.05, blocks: Mapping[str, torch.Tensor] | None = None) -> TraceEstimate:
    """tr H ≈ mean_i z_iᵀ H z_i, z Rademacher (Hutchinson 1990); per-block tr(H_bb) from the same HVPs.
    Stops once SE/|mean| ≤ ``rse`` after ``min_probes``; one HVP per probe."""
    if not 1 <= min_probes <= max_probes:
        raise ValueError(f"probes: need 1 <= min_probes <= max_probes, got {min_probes}, {max_probes}")
    start = op.hvps
    blocks = {b: idx.to(op.device) for b, idx in (blocks or {}).items()}
    samples, block_samples = [], {b: [] for b in blocks}
    while len(samples) < max_probes:
        z = (torch.randint(0, 2, (op.dim,), generator=generator, dtype=torch.int8).to(work_dtype(op)) * 2 - 1)
        z = z.to(op.device)
        hz = op.matvec(z)
        samples.append(dot64(z, hz))
        for b, idx in blocks.items():
            block_samples[b].append(dot64(z[idx], hz[idx]))
        if len(samples) >= min_probes:
            mean, se = _mean_se(torch.tensor(samples, dtype=REDUCE_DTYPE))
            if mean != 0 and se / abs(mean) <= rse:
                break
    mean, se = _mean_se(torch.tensor(samples, dtype=REDUCE_DTYPE))
    return TraceEstimate(mean, se, len(samples), op.hvps - start,
                         {b: sum(s) / len(s) for b, s in block_samples.items()})


def block_lambda_max(op, blocks: Mapping[str, torch.Tensor], tol: float = 1e-3, max_hvps: int | None = None,
                     init: Mapping[str, torch.Tensor] | None = None,
                     generator: torch.Generator | None = None) -> dict[str, EigResult]:
    """λ_max(H_bb) for each block by LOBPCG on the restricted operator; one full HVP per block matvec."""
    out = {}
    for b, idx in blocks.items():
        out[b] = top_eigenvalues(block_operator(op, idx), k=1, tol=tol, max_hvps=max_hvps,
                                 init=(init or {}).get(b), generator=generator)
    return out

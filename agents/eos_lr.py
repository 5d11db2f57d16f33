"""Curvature-driven learning-rate control: the EoS controller and the CDAT baseline, behind one interface.

**EoS controller** (``schedule="eos"``). Every optimizer of the lab diverges on a quadratic once its sharpness λ
exceeds a threshold θ(η) = c/η (:mod:`probes.thresholds`, the one home of the formulas: c = 2 for GD, 2 + 2β for
heavy ball, (2 + 2β)/(1 + 2β) for Nesterov, (2 + 2β₁)/(1 − β₁) for Adam on λ₁(P⁻¹H)). With an estimate λ̂ of the
sharpness that threshold applies to, the ratio r = λ̂/θ(η) = ηλ̂/c is linear in η, so the η that puts r at the
target ρ is η·ρ/r. Every ``every`` steps the controller moves η toward it, by a bounded factor:

    η ← clip(η·ρ/r, η/m, η·m)            (m = ``max_change`` > 1)

and an estimate that is non-finite or ≤ 0 (no positive curvature measured) leaves η unchanged (no estimate at all,
e.g. Adam before its first step, is retried at the next step). Between updates η
is constant. Back-off: on a loss spike, loss_t > ``spike`` · EMA(loss) (only while the EMA is > 0: CE and MSE,
not a PPO surrogate near 0), η ← η·``backoff`` at once, for the step being taken. η is a finite positive number
at all times: every candidate is checked before it is applied. Unit of η: that of ``OptimConfig.lr``; every param
group is scaled by the same factor, so per-group LR ratios are kept.

**Estimators** (``estimator=``, :data:`ESTIMATORS`): ``SharpnessEstimator(ctx, generator) -> Estimate`` on a
``probes.ProbeContext`` (the objective the optimizer steps on at θ_t, its batch, the optimizer), with a state
dict for checkpoints. ``"rayleigh"``: the warm Rayleigh quotient vᵀAv of a top eigenvector of A = H (SGD) or
A = P^-½HP^-½ (Adam family, :func:`probes.sharpness.preconditioned_operator`), refined by LOBPCG
(:func:`probes.eigs.top_eigenvalues`) warm-started from the previous v: ``hvps`` HVPs per update (1 = the plain
Rayleigh quotient of the warm vector), up to ``cold_hvps`` for the first (cold) one, plus one graph build of the
batch (≈ 1.3 G, G = one forward + backward of the batch). A Ritz value is ≤ λ_max, so λ̂ errs low and the real
ratio sits slightly above the estimated one while v is not converged.

``"critical"``: critical sharpness λc = 2/ηc along the step the optimizer is about to take (Kalra et al. 2026,
:mod:`probes.critical`): u = Δθ/η from a dry step (:func:`update_steps`), ηc the smallest step along u that
raises the batch loss. Its edge is one-step for every optimizer, λc = 2/η ⟺ the step taken would raise the loss
(momentum and Adam's preconditioning are inside u), so its ratio is η·λc/2 = 1/s_c, the step taken over the
critical one, and ρ = 0.9 takes 90 % of it. On a quadratic λc = uᵀHu/(−gᵀu): under GD gᵀHg/gᵀg ≤ λ_max (the
gradient's curvature, not the top eigenvalue); with momentum it can exceed λ_max, and when u points uphill
(−gᵀu ≤ 0, as in a momentum oscillation) there is no ηc: the estimate is NaN and η is left unchanged. Under
full-batch GD on the Cohen MLP this puts η above the λ_max edge (η·λ_max/2 ≈ 1.3–1.5 at ρ = 1) where the loss still
falls (tests/test_eos_lr.py). Cost: a dry optimizer step + forward passes only (6–8 cold, 3 when ηc moved less
than ``critical_rtol``, 4 when u is uphill for the batch; ``optim/est_forwards``), no HVP and no graph build.

**CDAT** (``schedule="cdat"``, Roulet et al. 2024, arXiv 2407.06183): with u the base optimizer's update per unit
η (Δθ = η·u, from a dry step of the optimizer at η = 1 on a copy of its state: no forward pass) and g the batch
gradient, n = max(−gᵀu, 0), d = |uᵀHu| (1 HVP + 1 graph build), EMAs n̄ ← βn̄ + (1 − β)n and d̄ likewise (started
at the first values), η = σ·n̄/(d̄ + ε). σ = 1 is the quadratically greedy step, σ = 2 puts the step "on edge" along
u. Their finding, the bar to beat: greedy tuners lose to a tuned constant LR in full batch; σ ≈ 2 matches or beats
it. Only the finiteness guard is added (a non-finite or non-positive η̂ leaves η unchanged).

**Noise** (``noise`` > 0, either schedule; the proposal's SDE term dθ = −η∇L dt + σ dW, off by default): after η is
set, isotropic Gaussian noise ζ = noise·‖g‖/√d · ξ (ξ ~ N(0, I_d), so ‖ζ‖ ≈ noise·‖g‖) is added to the gradient
in ``.grad``, so a GD step is the Euler–Maruyama step θ ← θ − η(g + ζ) with σ_t = η_t·noise·‖g‖/√d: the noise
follows the controller's η. ξ comes from a private generator seeded by (seed, step): the global RNG is untouched
and a resumed run draws the same ξ. Under Adam the noise is preconditioned like the gradient. Cost: one draw of d.

Logged per step (keys ``optim/...``): ``lr`` (the η of this step), ``sharpness_est`` (λ̂; for CDAT the directional
curvature uᵀHu/uᵀu), ``ratio_est`` (λ̂/θ(η) at the η of this step, θ the estimator's threshold), ``est_hvps``,
``est_grads`` and ``est_forwards`` (HVPs, first-order passes and forward-only passes over the batch spent this
step; 0 between updates), ``est_seconds``, ``backoff`` (1 on a spike
back-off), ``noise_norm`` (‖ζ‖, with noise on).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol

import torch

from probes import ProbeContext
from probes.context import preserved_state
from probes.critical import critical_sharpness
from probes.eigs import dot64, top_eigenvalues
from probes.hvp import HessianOperator
from probes.sharpness import adam_preconditioner, preconditioned_operator, rayleigh_pair
from probes.thresholds import stability_thresholds

__all__ = ["ControlConfig", "control_errors", "CONTROLLED", "Estimate", "SharpnessEstimator", "WarmRayleigh",
           "CriticalEstimate", "ESTIMATORS", "EosController", "CdatController", "build_controller",
           "controller_tag", "threshold_constant", "update_direction", "update_steps"]

CONTROLLED = ("eos", "cdat")  # the OptimConfig.schedule values that this module implements


@dataclass(frozen=True)
class ControlConfig:
    """Knobs of the curvature-driven schedules (``OptimConfig.schedule`` "eos" or "cdat"); ignored otherwise."""

    target: float = 0.9
    """eos: target ratio ρ = η·λ̂/c = λ̂/threshold(η) (1 = at the edge of stability)."""
    every: int = 10
    """Update η every this many optimizer steps (the estimate's cost is paid only then)."""
    max_change: float = 1.5
    """eos: η changes by at most this factor per update (> 1)."""
    estimator: str = "rayleigh"
    """eos: sharpness estimate, rayleigh or critical (see agents.eos_lr.ESTIMATORS)."""
    hvps: int = 3
    """eos/rayleigh: HVPs per warm estimate (1 = the Rayleigh quotient of the previous top eigenvector)."""
    cold_hvps: int = 20
    """eos/rayleigh: HVP budget of the first (cold) estimate."""
    tol: float = 1e-3
    """eos/rayleigh: LOBPCG residual tolerance (an estimate may stop before its HVP budget)."""
    critical_rtol: float = 0.05
    """eos/critical: relative width of the final bracket of ηc."""
    critical_max_forwards: int = 20
    """eos/critical: forward passes at most per estimate (NaN beyond: η is then left unchanged)."""
    spike: float = 2.0
    """eos: back off when the loss exceeds this multiple of its EMA (0 = never). Meant for positive losses (CE, MSE);
    a PPO loss (surrogate + KL) has no fixed sign and hovers near 0, where any ratio fires: use 0 for RLVR."""
    backoff: float = 0.5
    """eos: factor applied to η on a spike, in (0, 1)."""
    loss_ema: float = 0.9
    """eos: EMA coefficient of the loss that spikes are measured against."""
    cdat_scale: float = 2.0
    """cdat: σ (1 = quadratically greedy, 2 = on edge)."""
    cdat_ema: float = 0.9
    """cdat: EMA coefficient β of the numerator and denominator."""
    cdat_eps: float = 1e-12
    """cdat: ε added to the denominator."""
    noise: float = 0.0
    """Gradient noise ‖ζ‖ ≈ noise·‖g‖, isotropic Gaussian, after η is set (the SDE term; 0 = off)."""


def control_errors(c: ControlConfig, prefix: str = "optim.control") -> list[str]:
    """Problems with ``c`` ([] = valid); comparisons are written so that NaN fails them."""
    errors = []
    if not (math.isfinite(c.target) and c.target > 0):
        errors.append(f"{prefix}.target={c.target} must be a finite number > 0")
    if not (isinstance(c.every, int) and c.every >= 1):
        errors.append(f"{prefix}.every={c.every} must be an integer >= 1")
    if not (math.isfinite(c.max_change) and c.max_change > 1):
        errors.append(f"{prefix}.max_change={c.max_change} must be a finite number > 1")
    if c.estimator not in ESTIMATORS:
        errors.append(f"{prefix}.estimator={c.estimator!r} is unknown; choose one of {tuple(ESTIMATORS)}")
    if not 0 < c.critical_rtol < 1:
        errors.append(f"{prefix}.critical_rtol={c.critical_rtol} must be in (0, 1)")
    for name in ("hvps", "cold_hvps", "critical_max_forwards"):
        if not (isinstance(getattr(c, name), int) and getattr(c, name) >= 1):
            errors.append(f"{prefix}.{name}={getattr(c, name)} must be an integer >= 1")
    if not (math.isfinite(c.tol) and c.tol > 0):
        errors.append(f"{prefix}.tol={c.tol} must be a finite number > 0")
    if not (math.isfinite(c.spike) and (c.spike == 0 or c.spike > 1)):
        errors.append(f"{prefix}.spike={c.spike} must be 0 (off) or a finite number > 1")
    if not 0 < c.backoff < 1:
        errors.append(f"{prefix}.backoff={c.backoff} must be in (0, 1)")
    for name in ("loss_ema", "cdat_ema"):
        if not 0 <= getattr(c, name) < 1:
            errors.append(f"{prefix}.{name}={getattr(c, name)} must be in [0, 1)")
    if not (math.isfinite(c.cdat_scale) and c.cdat_scale > 0):
        errors.append(f"{prefix}.cdat_scale={c.cdat_scale} must be a finite number > 0")
    if not (math.isfinite(c.noise) and c.noise >= 0):
        errors.append(f"{prefix}.noise={c.noise} must be a finite number >= 0 (0 = off)")
    if not (math.isfinite(c.cdat_eps) and c.cdat_eps > 0):
        errors.append(f"{prefix}.cdat_eps={c.cdat_eps} must be a finite number > 0")
    return errors


def controller_tag(schedule: str, control: ControlConfig) -> str:
    """The part of a run name that a controller adds: "-eos0.9" (rayleigh), "-eos0.9-critical", "-cdat2"; "" for
    a schedule this module does not implement (runs at different targets or estimators must not share a name)."""
    if schedule == "eos":
        return f"-eos{control.target:g}" + ("" if control.estimator == "rayleigh" else f"-{control.estimator}")
    if schedule == "cdat":
        return f"-cdat{control.cdat_scale:g}"
    return ""


# ---- thresholds ----------------------------------------------------------------------------------------------
def threshold_constant(optimizer: torch.optim.Optimizer) -> float:
    """c with threshold(η) = c/η for ``optimizer``'s first param group: probes.thresholds at η = 1, the Adam
    threshold for the Adam family, the momentum one for SGD with momentum, else 2 (GD)."""
    t = stability_thresholds(optimizer, 1.0)
    return float(t.get("adam_threshold", t.get("momentum_threshold", t["two_over_eta"])))


def _is_adam(optimizer: torch.optim.Optimizer | None) -> bool:
    return optimizer is not None and bool(optimizer.param_groups) and "betas" in optimizer.param_groups[0]


# ---- estimators ----------------------------------------------------------------------------------------------
class Estimate(NamedTuple):
    value: float      # λ̂ (NaN: no estimate, e.g. Adam before its first step)
    hvps: int         # HVPs spent
    grads: int        # first-order passes over the batch (graph builds / gradients)
    forwards: int = 0  # forward-only passes over the batch


class SharpnessEstimator(Protocol):
    """λ̂ of the sharpness that the optimizer's threshold applies to (H for SGD, P^-½HP^-½ for the Adam family).
    Must leave params, ``.grad``, optimizer state, global RNGs and train/eval flags untouched; its state (warm
    starts) must make a resumed run estimate bit for bit what the uninterrupted one does. An estimator may define
    ``threshold(optimizer) -> c``, the constant of its own edge c/η; without it the optimizer's stability threshold
    (:func:`threshold_constant`) applies."""

    def __call__(self, ctx: ProbeContext, generator: torch.Generator) -> Estimate: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class WarmRayleigh:
    """λ̂ = vᵀAv for v the top eigenvector of LOBPCG warm-started from the previous v (A = H, or P^-½HP^-½ under
    Adam). Cost: 1 graph build (≈1.3 G) + ``hvps`` HVPs (``cold_hvps`` the first time)."""

    def __init__(self, hvps: int = 3, cold_hvps: int = 20, tol: float = 1e-3):
        self.hvps, self.cold_hvps, self.tol = hvps, cold_hvps, tol
        self.warm: torch.Tensor | None = None

    def __call__(self, ctx: ProbeContext, generator: torch.Generator) -> Estimate:
        op = HessianOperator(ctx.params, ctx.loss_fn, ctx.batches, mode="cache", model=ctx.model)
        try:
            a = op
            if _is_adam(ctx.optimizer):
                precond = adam_preconditioner(ctx.optimizer, ctx.params, ctx.lr, op.dtype)
                if precond is None:  # Adam before its first step: no preconditioner, no threshold to aim at
                    return Estimate(math.nan, 0, 0)
                a = preconditioned_operator(op, precond)
            init = self.warm if self.warm is not None and self.warm.shape[0] == op.dim else None
            budget = self.hvps if init is not None else max(self.hvps, self.cold_hvps)
            res = top_eigenvalues(a, k=1, tol=self.tol, init=None if init is None else init.to(op.device),
                                  max_hvps=budget, generator=generator, stop="residual")
            value = float(res.values[0])
            if math.isfinite(value):  # a non-finite solve must not poison the next warm start
                self.warm = res.vectors[:, 0].detach().to("cpu", copy=True)
            return Estimate(value, op.hvps, op.gradient_evals)
        finally:
            op.release()

    def state_dict(self) -> dict[str, Any]:
        return {"warm": self.warm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warm = state.get("warm")


class CriticalEstimate:
    """λ̂ = λc = 2/ηc along u = Δθ/η of the step about to be taken (module docstring), warm-started from the previous
    ηc. Its edge is λc = 2/η for every optimizer (``threshold`` = 2). Cost: a dry optimizer step + forward passes."""

    def __init__(self, rtol: float = 0.05, max_forwards: int = 20):
        self.rtol, self.max_forwards = rtol, max_forwards
        self.eta: float | None = None   # the previous ηc (warm start of the bracket)

    @staticmethod
    def threshold(optimizer: torch.optim.Optimizer) -> float:
        return 2.0

    def __call__(self, ctx: ProbeContext, generator: torch.Generator) -> Estimate:
        lr = float(ctx.optimizer.param_groups[0]["lr"])
        update = {name: lr * step for name, step in update_steps(ctx.optimizer, ctx.params).items()}   # Δθ = η·u
        cs = critical_sharpness(ctx.params, ctx.loss_fn, ctx.batches, update, lr, from_previous=False,
                                rtol=self.rtol, max_forwards=self.max_forwards, eta_guess=self.eta)
        if math.isfinite(cs.value):   # an unbracketed search keeps the last good warm start
            self.eta = cs.eta
        return Estimate(cs.value, 0, 0, cs.forwards)

    def state_dict(self) -> dict[str, Any]:
        return {"eta": self.eta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.eta = state.get("eta")


# name -> factory(ControlConfig)
ESTIMATORS: dict[str, Callable[[ControlConfig], SharpnessEstimator]] = {
    "rayleigh": lambda c: WarmRayleigh(hvps=c.hvps, cold_hvps=c.cold_hvps, tol=c.tol),
    "critical": lambda c: CriticalEstimate(rtol=c.critical_rtol, max_forwards=c.critical_max_forwards),
}


# ---- controllers ---------------------------------------------------------------------------------------------
def _finite_positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


class _Controller:
    """Owns η: sets every param group's lr to base_g · η/base_0. ``__call__(ctx, loss)`` runs once per optimizer
    step, after the gradient is in ``.grad`` (clipped, if clipping is on) and before ``optimizer.step()``."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ControlConfig, seed: int = 0):
        self.optimizer, self.cfg, self.seed = optimizer, cfg, seed
        self.base = [float(g["lr"]) for g in optimizer.param_groups]
        self.lr = self.base[0]

    def due(self, step: int) -> bool:
        return step % self.cfg.every == 0

    def _set(self, lr: float) -> None:
        if not _finite_positive(lr):  # unreachable by construction; the invariant is worth a loud failure
            raise RuntimeError(f"lr controller: refusing a non-finite or non-positive lr {lr!r}")
        self.lr = lr
        self.apply()

    def apply(self) -> None:
        """Write η to the optimizer's param groups (also after a checkpoint load reset them)."""
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = self.lr * (base / self.base[0])   # group 0 gets η exactly (ratio 1.0)

    def _generator(self, step: int) -> torch.Generator:
        # private, seeded from (seed, step): a resumed run draws what the uninterrupted one drew
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step + 7) % (2 ** 63))

    def add_noise(self, params: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """.grad += ζ, ζ = noise·‖g‖/√d · ξ over ``params`` (see module docstring); {} when noise is off."""
        if self.cfg.noise <= 0:
            return {}
        grads = [p.grad for p in params.values() if p.grad is not None]
        if not grads:
            return {}
        d = sum(g.numel() for g in grads)
        gnorm = float(torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grads)))
        scale = self.cfg.noise * gnorm / math.sqrt(d)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step + 7919) % (2 ** 63))
        total = 0.0
        for g in grads:   # drawn on CPU in float64 (device-independent), then cast
            xi = torch.randn(g.shape, generator=gen, dtype=torch.float64) * scale
            total += float((xi ** 2).sum())
            g.add_(xi.to(device=g.device, dtype=g.dtype))
        return {"optim/noise_norm": math.sqrt(total)}

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr = float(state["lr"])
        self.apply()


class EosController(_Controller):
    """η ← clip(η·ρ/r, η/m, η·m) every ``every`` steps, r = λ̂/threshold(η); spike back-off every step."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ControlConfig, seed: int = 0,
                 estimator: SharpnessEstimator | None = None):
        super().__init__(optimizer, cfg, seed)
        self.estimator = estimator if estimator is not None else ESTIMATORS[cfg.estimator](cfg)
        self.loss_ema: float | None = None
        self.last_est = math.nan
        self.retry = False  # the last due step had no estimate at all (Adam without state yet): try again next step

    def threshold_constant(self) -> float:
        """c of the edge c/η that the ratio is taken against: the estimator's own, else the optimizer's."""
        own = getattr(self.estimator, "threshold", None)
        return float(own(self.optimizer)) if own is not None else threshold_constant(self.optimizer)

    def propose(self, estimate: float) -> float:
        """The η the rule gives for sharpness estimate ``estimate`` at the current η (the current η when the
        estimate is unusable). Pure: changes nothing."""
        if not (math.isfinite(estimate) and estimate > 0):
            return self.lr
        ratio = estimate * self.lr / self.threshold_constant()
        m = self.cfg.max_change
        new = min(max(self.lr * self.cfg.target / ratio, self.lr / m), self.lr * m)
        return new if _finite_positive(new) else self.lr

    def observe_loss(self, loss: float) -> bool:
        """Update the loss EMA; True (and η backed off) on a spike. A non-finite loss is a spike too."""
        c = self.cfg
        spike = False
        if c.spike > 0 and self.loss_ema is not None and self.loss_ema > 0:
            spike = not math.isfinite(loss) or loss > c.spike * self.loss_ema
        if spike:
            self._set(self.lr * c.backoff)
        if math.isfinite(loss):
            # the spike enters the EMA too: a new, higher loss level does not trigger a back-off every step
            self.loss_ema = loss if self.loss_ema is None else c.loss_ema * self.loss_ema + (1 - c.loss_ema) * loss
        return spike

    def __call__(self, ctx: ProbeContext, loss: float) -> dict[str, float]:
        t0 = time.perf_counter()
        row = {"optim/est_hvps": 0.0, "optim/est_grads": 0.0, "optim/est_forwards": 0.0}
        step = int(ctx.step)
        if self.due(step) or self.retry:
            with preserved_state(ctx.model, eval_mode=True):
                est = self.estimator(ctx, self._generator(step))
            self._set(self.propose(est.value))
            self.last_est = est.value
            self.retry = est.hvps == 0 and est.forwards == 0 and not math.isfinite(est.value)
            row.update({"optim/est_hvps": float(est.hvps), "optim/est_grads": float(est.grads),
                        "optim/est_forwards": float(est.forwards)})
        row["optim/backoff"] = float(self.observe_loss(loss))
        row.update(self.add_noise(ctx.params, step))
        c = self.threshold_constant()
        row.update({"optim/lr": self.lr, "optim/sharpness_est": self.last_est,
                    "optim/ratio_est": self.last_est * self.lr / c, "optim/est_seconds": time.perf_counter() - t0})
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "loss_ema": self.loss_ema, "last_est": self.last_est, "retry": self.retry,
                "estimator": self.estimator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.loss_ema, self.last_est, self.retry = state["loss_ema"], float(state["last_est"]), bool(state["retry"])
        self.estimator.load_state_dict(state["estimator"])


def update_direction(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """u = Δθ/η of the optimizer's next step from the current ``.grad``, flat float64 over ``params`` (in order):
    :func:`update_steps` concatenated."""
    return torch.cat([d.reshape(-1) for d in update_steps(optimizer, params).values()])


def update_steps(optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Δθ/η of the optimizer's next step from the current ``.grad``, per parameter of ``params``, float64.

    A dry step at lr = 1 (per-group ratios kept) on the live tensors, then parameters and optimizer state are
    restored bit for bit. Exact for torch's SGD/Adam/AdamW, whose Δθ is linear in lr. Cost: one optimizer step and
    a copy of its state; no forward pass."""
    owned = [p for g in optimizer.param_groups for p in g["params"]]
    saved_params = [p.detach().clone() for p in owned]
    saved_state = copy.deepcopy(optimizer.state_dict())
    before = {k: p.detach().clone() for k, p in params.items()}
    ref = float(optimizer.param_groups[0]["lr"])
    try:
        for g in optimizer.param_groups:
            g["lr"] = float(g["lr"]) / ref
        optimizer.step()
        steps = {k: (p.detach() - before[k]).to(torch.float64) for k, p in params.items()}
    finally:
        with torch.no_grad():
            for p, s in zip(owned, saved_params):
                p.copy_(s)
        optimizer.load_state_dict(saved_state)  # also restores each group's lr
    return steps


class CdatController(_Controller):
    """η = σ·n̄/(d̄ + ε), n = max(−gᵀu, 0), d = |uᵀHu| (Roulet et al. 2024), every ``every`` steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ControlConfig, seed: int = 0):
        super().__init__(optimizer, cfg, seed)
        self.num: float | None = None
        self.den: float | None = None
        self.last_est = math.nan

    def __call__(self, ctx: ProbeContext, loss: float) -> dict[str, float]:
        t0 = time.perf_counter()
        row = {"optim/est_hvps": 0.0, "optim/est_grads": 0.0, "optim/est_forwards": 0.0}
        if self.due(int(ctx.step)):
            with preserved_state(ctx.model, eval_mode=True):
                u = update_direction(self.optimizer, ctx.params)
                op = HessianOperator(ctx.params, ctx.loss_fn, ctx.batches, mode="cache", model=ctx.model)
                try:
                    curv, u, hu = rayleigh_pair(op, u)
                    g = op.gradient()
                    n, d = max(-dot64(g, u), 0.0), abs(dot64(u, hu))
                    row.update({"optim/est_hvps": float(op.hvps), "optim/est_grads": float(op.gradient_evals)})
                finally:
                    op.release()
            if math.isfinite(n) and math.isfinite(d):
                b = self.cfg.cdat_ema
                self.num = n if self.num is None else b * self.num + (1 - b) * n
                self.den = d if self.den is None else b * self.den + (1 - b) * d
                new = self.cfg.cdat_scale * self.num / (self.den + self.cfg.cdat_eps)
                if _finite_positive(new):
                    self._set(new)
            self.last_est = curv
        row.update(self.add_noise(ctx.params, int(ctx.step)))
        c = threshold_constant(self.optimizer)
        row.update({"optim/lr": self.lr, "optim/sharpness_est": self.last_est,
                    "optim/ratio_est": self.last_est * self.lr / c, "optim/backoff": 0.0,
                    "optim/est_seconds": time.perf_counter() - t0})
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "num": self.num, "den": self.den, "last_est": self.last_est}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.num, self.den, self.last_est = state["num"], state["den"], float(state["last_est"])


def build_controller(optimizer: torch.optim.Optimizer, schedule: str, cfg: ControlConfig,
                     seed: int = 0) -> EosController | CdatController | None:
    """The controller of ``schedule`` ("eos" / "cdat") on ``optimizer``, starting from its current lr; None for
    the fixed schedules (constant, linear, cosine), which agents.optim.build_scheduler handles."""
    errors = control_errors(cfg)
    if errors:
        raise ValueError("; ".join(errors))
    if schedule == "eos":
        return EosController(optimizer, cfg, seed)
    if schedule == "cdat":
        return CdatController(optimizer, cfg, seed)
    return None

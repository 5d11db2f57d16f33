"""Every probe kind, registered once: name -> measurement, the ``ProbeConfig`` cadence that schedules it, the metric
keys it emits and its cost. The :class:`~probes.prober.Prober` runs the due kinds in registry order.

A measurement is ``measure(run: ProbeStep) -> dict[str, float]`` (keys without ``probe/``), a thin call of a tested
function of :mod:`probes.sharpness`, :mod:`probes.eigs` or :mod:`probes.thresholds` on the step's shared
probe-batch operator. It returns {} where it does not apply (no update yet, no Adam state, no ``sample_batch``).
Order matters: the step and update pairs (u, Hu) seed the warm λ_max solve, and the Adam solve runs only where
the thresholds found an Adam-family optimizer. Adding a probe is one ``ProbeKind`` here (plus its knobs in
``ProbeConfig`` and its keys in CONTRACTS.md, which tests/test_probes_registry.py checks).

Costs: G = one probe-batch gradient, an HVP ≈ 1.6–2.2 G in cache mode (probes.hvp).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .blocks import parameter_blocks
from .config import ProbeConfig
from .context import ProbeContext
from .eigs import top_eigenvalues
from .hvp import HessianOperator
from .sharpness import (adam_sharpness, batch_sharpness, block_lambda_max, hutchinson_trace, step_pair,
                        update_pair)
from .thresholds import stability_thresholds

__all__ = ["ProbeKind", "ProbeStep", "PROBES", "metric_keys"]


@dataclass
class ProbeStep:
    """What the probe kinds of one probe step share: the context, the config, the probe-batch operator, the step's
    private generator (consumed in registry order), the Prober's warm starts (read and updated in place), the
    metrics so far, and the (u, Hu) pairs that seed the warm λ_max solve."""
    ctx: ProbeContext
    config: ProbeConfig
    op: HessianOperator
    generator: torch.Generator
    warm: dict[str, torch.Tensor]
    out: dict[str, float] = field(default_factory=dict)
    known: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    other_hvps: int = 0            # HVPs on operators other than ``op`` (batch sharpness's minibatch operators)
    _blocks: dict[str, torch.Tensor] | None = None

    def init(self, key: str) -> torch.Tensor | None:
        """The warm start stored under ``key`` when warm starts are on and it fits the operator, else None."""
        v = self.warm.get(key) if self.config.warm_start else None
        return v.to(self.op.device) if v is not None and v.shape[0] == self.op.dim else None

    def blocks(self) -> dict[str, torch.Tensor]:
        """Parameter blocks of the operator (computed once per step); shapes and the model config let fused
        Q/K/V matrices split into attn_qk / attn_vo."""
        if self._blocks is None:
            op = self.op
            self._blocks = parameter_blocks(op.names, [p.numel() for p in op.params], self.config.block_patterns,
                                            shapes=[p.shape for p in op.params],
                                            config=getattr(self.ctx.model, "config", None))
        return self._blocks


@dataclass(frozen=True)
class ProbeKind:
    name: str
    cadence: str                  # the ProbeConfig field giving its period in optimizer steps (0 = off)
    keys: tuple[str, ...]         # metric keys without "probe/"; {i} and {block} stand for an index and a block
    cost: str                     # HVPs (or G) per run, for the docs
    measure: Callable[[ProbeStep], dict[str, float]]


# ---- measurements ------------------------------------------------------------------------------------------
def _thresholds(run: ProbeStep) -> dict[str, float]:
    if run.ctx.lr <= 0:   # η = 0 (e.g. a warm-up step) has no stability threshold
        return {}
    return stability_thresholds(run.ctx.optimizer, run.ctx.lr)


def _step_sharpness(run: ProbeStep) -> dict[str, float]:
    if not run.config.step_sharpness:
        return {}
    value, g, hg = step_pair(run.op)
    run.known.append((g, hg))
    return {"step_sharpness": value}


def _update_sharpness(run: ProbeStep) -> dict[str, float]:
    if not run.config.update_sharpness or run.ctx.update is None:
        return {}
    value, u, hu = update_pair(run.op, run.ctx.update)
    run.known.append((u, hu))
    return {"update_sharpness": value}


def _lambda_max(run: ProbeStep) -> dict[str, float]:
    # The step and update pairs join the first Rayleigh–Ritz beside a warm start for free (it maximises θ, so
    # they only help). A cold solve starts from a random vector alone: beside it, a g inside an invariant subspace
    # that misses the top eigenvector would win the first Rayleigh–Ritz and trap the solve
    # (tests/test_probes_context.py).
    c, init = run.config, run.init("H")
    known = (torch.stack([v for v, _ in run.known], 1), torch.stack([a for _, a in run.known], 1)) \
        if run.known and init is not None else None
    res = top_eigenvalues(run.op, k=c.k, tol=c.tol, init=init, max_hvps=c.max_hvps, generator=run.generator,
                          stop=c.stop, known=known)
    run.warm["H"] = res.vectors.detach()
    out = {"lambda_max": float(res.values[0])}
    out.update({f"lambda_{i + 1}": float(res.values[i]) for i in range(1, len(res.values))})
    out["converged"] = float(res.converged)
    return out


def _adam_lambda_max(run: ProbeStep) -> dict[str, float]:
    c, ctx = run.config, run.ctx
    if not c.adam or ctx.optimizer is None or "adam_threshold" not in run.out:
        return {}
    res = adam_sharpness(run.op, ctx.optimizer, ctx.lr, k=1, tol=c.tol, init=run.init("adam"),
                         max_hvps=c.max_hvps, generator=run.generator, stop=c.stop)
    if res is None:
        return {}
    run.warm["adam"] = res.vectors.detach()
    return {"adam_lambda_max": float(res.values[0]),
            "converged": float(bool(run.out["converged"]) and res.converged)}


def _batch_sharpness(run: ProbeStep) -> dict[str, float]:
    c, ctx = run.config, run.ctx
    if ctx.sample_batch is None:
        return {}
    bs = batch_sharpness(ctx.params, ctx.loss_fn, ctx.sample_batch, run.generator, min_samples=c.batch_min_samples,
                         max_samples=c.batch_max_samples, rse=c.batch_rse, estimator=c.batch_estimator,
                         confidence=c.confidence, mode=c.mode, model=ctx.model, full_op=run.op if c.gni else None)
    run.other_hvps += bs.hvps - len(bs.samples.get("gHfull_g", []))   # the GNI HVPs are on run.op
    out = {"batch_sharpness": bs.ratio_of_means, "batch_sharpness_ci_lo": bs.rom_ci[0],
           "batch_sharpness_ci_hi": bs.rom_ci[1], "batch_sharpness_n": float(bs.n),
           "batch_sharpness_mor": bs.mean_of_ratios, "batch_sharpness_mor_ci_lo": bs.mor_ci[0],
           "batch_sharpness_mor_ci_hi": bs.mor_ci[1]}
    if c.gni:
        out["gni"] = bs.gni
    return out


def _trace(run: ProbeStep) -> dict[str, float]:
    c, blocks = run.config, run.blocks()
    tr = hutchinson_trace(run.op, run.generator, max_probes=c.trace_max_probes, min_probes=min(8, c.trace_max_probes),
                          rse=c.trace_rse, blocks=blocks)
    out = {"trace": tr.trace}
    for b, v in tr.blocks.items():
        out[f"block/{b}/trace"] = v
        out[f"block/{b}/trace_per_param"] = v / int(blocks[b].numel())
    return out


def _block_lambda_max(run: ProbeStep) -> dict[str, float]:
    c = run.config
    res = block_lambda_max(run.op, run.blocks(), tol=c.tol, max_hvps=c.max_hvps, generator=run.generator)
    return {f"block/{b}/lambda_max": float(r.values[0]) for b, r in res.items()}


# ---- the registry, in run order ----------------------------------------------------------------------------
PROBES: tuple[ProbeKind, ...] = (
    ProbeKind("thresholds", "every", ("two_over_eta", "momentum_threshold", "adam_threshold"), "0 HVPs",
              _thresholds),
    ProbeKind("step_sharpness", "every", ("step_sharpness",), "1 HVP", _step_sharpness),
    ProbeKind("update_sharpness", "every", ("update_sharpness",), "1 HVP", _update_sharpness),
    ProbeKind("lambda_max", "every", ("lambda_max", "lambda_{i}", "converged"),
              "k HVPs, then 1 per unconverged vector per iteration (≤ max_hvps); warm ≈ 2–4", _lambda_max),
    ProbeKind("adam_lambda_max", "every", ("adam_lambda_max", "converged"), "as lambda_max, k = 1",
              _adam_lambda_max),
    ProbeKind("batch_sharpness", "batch_sharpness_every",
              ("batch_sharpness", "batch_sharpness_ci_lo", "batch_sharpness_ci_hi", "batch_sharpness_n",
               "batch_sharpness_mor", "batch_sharpness_mor_ci_lo", "batch_sharpness_mor_ci_hi", "gni"),
              "per minibatch draw ≈2.8 G_b (+1 HVP with gni), batch_min_samples..batch_max_samples draws",
              _batch_sharpness),
    ProbeKind("trace", "trace_every", ("trace", "block/{block}/trace", "block/{block}/trace_per_param"),
              "1 HVP per Rademacher probe, ≤ trace_max_probes", _trace),
    ProbeKind("block_lambda_max", "blocks_every", ("block/{block}/lambda_max",),
              "one solve per block, 1 full HVP per block matvec", _block_lambda_max),
)

# Emitted by the Prober itself around the kinds: HVPs over all operators, wall time of the probe step.
PROBER_KEYS = ("hvps", "seconds")


def metric_keys() -> tuple[str, ...]:
    """Every metric key a Prober can emit, with ``probe/`` and the {i} / {block} placeholders."""
    keys = [k for kind in PROBES for k in kind.keys] + list(PROBER_KEYS)
    return tuple(f"probe/{k}" for k in dict.fromkeys(keys))

"""Every probe kind, registered once: name -> measurement, the ``ProbeConfig`` cadence that schedules it, the metric
keys it emits and its cost. The :class:`~probes.prober.Prober` runs the due kinds in registry order.

Which Hessian each key is: H = ∇²L of the regime's exact objective L (SFT token-mean CE, PPO surrogate on a frozen
rollout buffer) over the trainable parameters, on one of two chunk sets of the :class:`~probes.context.ProbeContext`:
- the probe set P (``ctx.probe_set``; ``ctx.batches`` when None): the fixed set of the training objective. Under
  full-batch GD it is the whole training set; under minibatch SFT a fixed subset of ``probe_set_size`` training
  examples drawn once, the same at every step; under PPO (no fixed training set) the current rollout buffer.
  ``lambda_max``, ``lambda_{i}``, ``update_sharpness``, ``adam_lambda_max``, ``trace``, the per-block keys, ``gni``'s
  H and the cheap traces (``rayleigh``, ``alignment``, ``critical_sharpness``) are of H_P.
- the current batch B (``ctx.batches``, what the optimizer steps on now): ``lambda_max_batch`` and
  ``step_sharpness`` are of H_B; ``batch_sharpness`` averages over fresh minibatches. When P is B (``probe_set`` None
  or the same object), ``lambda_max_batch`` = ``lambda_max`` at no cost.

A measurement is ``measure(run: ProbeStep) -> dict[str, float]`` (keys without ``probe/``), a thin call of a tested
function of :mod:`probes.sharpness`, :mod:`probes.critical`, :mod:`probes.eigs` or :mod:`probes.thresholds` on the
step's shared operators. It returns {} where it does not apply (no update yet, no Adam state, no ``sample_batch``, no
stored eigenvector). Order matters: the step and update pairs (u, Hu) seed the warm solves on their operator, the
Adam solve runs only where the thresholds found an Adam-family optimizer, and the cheap traces read the eigenvector
of a solve that ran this step. Adding a probe is one ``ProbeKind`` here (plus its knobs in ``ProbeConfig`` and its
keys in CONTRACTS.md, which tests/test_probes_registry.py checks).

Costs: G = one probe-set gradient, an HVP ≈ 1.6–2.2 G in cache mode (probes.hvp), a forward pass ≈ ⅓ G.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .blocks import parameter_blocks
from .config import ProbeConfig
from .context import ProbeContext
from .critical import critical_sharpness
from .eigs import top_eigenvalues, work_dtype
from .hvp import HessianOperator
from .sharpness import (adam_sharpness, alignment, batch_sharpness, block_lambda_max, hutchinson_trace,
                        rayleigh_quotient, step_pair, update_pair)
from .thresholds import stability_thresholds

__all__ = ["ProbeKind", "ProbeStep", "PROBES", "metric_keys"]


@dataclass
class ProbeStep:
    """What the probe kinds of one probe step share: the context, the config, the probe-set operator ``op`` and the
    current-batch operator ``batch_op`` (the same object when the probe set is the batch), the step's private
    generator (consumed in registry order), the Prober's warm starts (read and updated in place), the metrics so
    far, and the (u, Hu) pairs that seed the warm solves on each operator."""
    ctx: ProbeContext
    config: ProbeConfig
    op: HessianOperator
    generator: torch.Generator
    warm: dict[str, torch.Tensor]
    batch_op: HessianOperator | None = None    # None: the probe set is the batch (``op``)
    out: dict[str, float] = field(default_factory=dict)
    known: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    batch_known: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    other_hvps: int = 0            # HVPs on operators other than ``op`` (batch sharpness's minibatch operators)
    _blocks: dict[str, torch.Tensor] | None = None

    @property
    def separate_batch(self) -> bool:
        """Whether the current batch has an operator of its own (the probe set is not the batch)."""
        return self.batch_op is not None and self.batch_op is not self.op

    def stored(self, key: str) -> torch.Tensor | None:
        """The eigenvectors stored under ``key`` (n, k) on the operator's device when they fit it, else None."""
        v = self.warm.get(key)
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
    # the current batch's g and H_B (EoSS step sharpness); the pair seeds the solve on that same operator
    if run.separate_batch:
        value, g, hg = step_pair(run.batch_op)
        run.batch_known.append(_seed_pair(run.batch_op, g, hg))
    else:
        value, g, hg = step_pair(run.op)
        run.known.append(_seed_pair(run.op, g, hg))
    return {"step_sharpness": value}


def _update_sharpness(run: ProbeStep) -> dict[str, float]:
    if not run.config.update_sharpness or run.ctx.update is None:
        return {}
    value, u, hu = update_pair(run.op, run.ctx.update)
    run.known.append(_seed_pair(run.op, u, hu))
    return {"update_sharpness": value}


def _seed_pair(op: HessianOperator, v: torch.Tensor, av: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, Av) kept until the solve that they seed, in the solver's dtype (float32 for a float32 model): the
    float64 pair, 4 parameter-sized float32 vectors' worth, would outlive its Rayleigh quotient for nothing."""
    dtype = work_dtype(op)
    return v.to(dtype), av.to(dtype)


def _solve(run: ProbeStep, op: HessianOperator, key: str, pairs: list, k: int):
    # The step and update pairs join the first Rayleigh–Ritz beside a warm start for free (it maximises θ, so
    # they only help). A cold solve starts from a random vector alone: beside it, a g inside an invariant subspace
    # that misses the top eigenvector would win the first Rayleigh–Ritz and trap the solve
    # (tests/test_probes_context.py).
    c = run.config
    handed = _hand_over(run, key, op, pairs)
    stop = c.stop_rule(warm=handed[0] is not None)
    # popped into the call, so that no frame here refers to them: the solver lets them go after its first
    # Rayleigh–Ritz, and their memory (3 parameter-sized vectors with the update pair) is free for the rest of it
    res = top_eigenvalues(op, k=k, tol=c.tol, known=handed.pop(), init=handed.pop(), max_hvps=c.max_hvps,
                          generator=run.generator, stop=stop)
    run.warm[key] = res.vectors.detach()
    return res


def _hand_over(run: ProbeStep, key: str, op: HessianOperator, pairs: list) -> list:
    """[init, known] of a solve, taken out of the warm store and ``pairs`` (the store gets the new vectors after the
    solve): the stored eigenvectors when warm starts are on and they fit the operator, and the known pairs (one
    passed as it is, several stacked) beside a warm start only."""
    v = run.warm.pop(key, None) if run.config.warm_start else None
    init = v.to(op.device) if v is not None and v.shape[0] == op.dim else None
    known = None
    if pairs and init is not None:
        vs, avs = zip(*pairs)
        known = (vs[0], avs[0]) if len(vs) == 1 else (torch.stack(vs, 1), torch.stack(avs, 1))
    pairs.clear()
    return [init, known]


def _lambda_max(run: ProbeStep) -> dict[str, float]:
    res = _solve(run, run.op, "H", run.known, run.config.k)
    out = {"lambda_max": float(res.values[0])}
    out.update({f"lambda_{i + 1}": float(res.values[i]) for i in range(1, len(res.values))})
    # converged: this solve and the batch's (solved before it, on its own operator) both converged
    out["converged"] = float(res.converged and bool(run.out.get("converged", 1.0)))
    if not run.separate_batch:   # the probe set is the batch: the same Hessian
        out["lambda_max_batch"] = out["lambda_max"]
    return out


def _lambda_max_batch(run: ProbeStep) -> dict[str, float]:
    if not run.separate_batch:   # the probe set is the batch: _lambda_max reports it
        return {}
    out = {}
    if run.config.batch_lambda_max:
        res = _solve(run, run.batch_op, "H_batch", run.batch_known, 1)
        out = {"lambda_max_batch": float(res.values[0]), "converged": float(res.converged)}
    # nothing after this uses the batch's graph (step sharpness built it): free it before the probe set's is built,
    # so that the two graphs (each the activations of a whole batch, with their gradient graphs) are never alive
    # together
    run.batch_op.release()
    return out


def _adam_lambda_max(run: ProbeStep) -> dict[str, float]:
    c, ctx = run.config, run.ctx
    if not c.adam or ctx.optimizer is None or "adam_threshold" not in run.out:
        return {}
    handed = _hand_over(run, "adam", run.op, [])
    stop = c.stop_rule(warm=handed[0] is not None)
    handed.pop()   # no known pairs for P^-½ H P^-½
    res = adam_sharpness(run.op, ctx.optimizer, ctx.lr, k=1, tol=c.tol, init=handed.pop(),
                         max_hvps=c.max_hvps, generator=run.generator, stop=stop)
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
                         confidence=c.confidence, mode=c.mode, model=ctx.model, full_op=run.op if c.gni else None,
                         cache_mb=c.cache_mb)
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


def _rayleigh(run: ProbeStep) -> dict[str, float]:
    if "lambda_max" in run.out:   # solved this step: the stored vector's quotient is its Ritz value, 0 HVPs
        return {"rayleigh": run.out["lambda_max"]}
    v = run.stored("H")
    return {} if v is None else {"rayleigh": rayleigh_quotient(run.op, v[:, 0])}


def _alignment(run: ProbeStep) -> dict[str, float]:
    v = run.stored("H")
    return {} if v is None else {"alignment": alignment(run.op, v[:, 0])}


def _critical(run: ProbeStep) -> dict[str, float]:
    c, ctx = run.config, run.ctx
    if ctx.update is None or ctx.lr <= 0:
        return {}
    # the trainer probes θ_t after stepping θ_{t-1} → θ_t = θ_{t-1} + Δθ: the line starts where the step started.
    # ηc = s_c·ctx.lr takes the current η for the step's (they differ only under a schedule, by its per-step change)
    # warm start from the last ηc (a 1-element "warm.critical" in the Prober's checkpointed state)
    prev = run.warm.get("critical")
    batches = run.op.batches[:c.critical_chunks] if c.critical_chunks else run.op.batches
    cs = critical_sharpness(ctx.params, ctx.loss_fn, batches, ctx.update, ctx.lr, from_previous=True,
                            rtol=c.critical_rtol, max_forwards=c.critical_max_forwards,
                            eta_guess=float(prev[0]) if prev is not None and c.warm_start else None)
    if math.isfinite(cs.eta):
        run.warm["critical"] = torch.tensor([cs.eta], dtype=torch.float64)
    return {"critical_sharpness": cs.value, "critical_forwards": float(cs.forwards)}


# ---- the registry, in run order ----------------------------------------------------------------------------
PROBES: tuple[ProbeKind, ...] = (
    ProbeKind("thresholds", "every", ("two_over_eta", "momentum_threshold", "adam_threshold"), "0 HVPs",
              _thresholds),
    ProbeKind("step_sharpness", "every", ("step_sharpness",), "1 HVP", _step_sharpness),
    # the current batch's kinds first (step sharpness, then its λ_max), its graph freed before the probe set's is built
    ProbeKind("lambda_max_batch", "every", ("lambda_max_batch", "converged"),
              "with batch_lambda_max: as lambda_max (k = 1) on the current batch, plus its graph (≈1.3 G_B); 0 when "
              "the probe set is the batch",
              _lambda_max_batch),
    ProbeKind("update_sharpness", "every", ("update_sharpness",), "1 HVP", _update_sharpness),
    ProbeKind("lambda_max", "every", ("lambda_max", "lambda_{i}", "converged", "lambda_max_batch"),
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
    ProbeKind("rayleigh", "rayleigh_every", ("rayleigh",),
              "1 HVP (+ the probe-set graph, ≈1.3 G, shared); 0 on a step that solved λ_max", _rayleigh),
    ProbeKind("alignment", "alignment_every", ("alignment",),
              "0 HVPs: the probe-set gradient (free with the graph, ≈1.3 G, shared)", _alignment),
    ProbeKind("critical_sharpness", "critical_every", ("critical_sharpness", "critical_forwards"),
              "forward passes of critical_chunks chunks of the probe set only (≈⅓ G each): 6–8 cold, 3 warm when ηc "
              "moved < rtol", _critical),
)

# Emitted by the Prober itself around the kinds: HVPs over all operators, wall time of the probe step, the wall
# time of each kind that ran ({kind} = its name; a graph built lazily counts to the first kind that used it), and in
# cache mode the probe set's chunks whose graphs fit ProbeConfig.cache_mb.
PROBER_KEYS = ("hvps", "seconds", "{kind}_seconds", "cached_chunks")


def metric_keys() -> tuple[str, ...]:
    """Every metric key a Prober can emit, with ``probe/`` and the {i} / {block} placeholders."""
    keys = [k for kind in PROBES for k in kind.keys] + list(PROBER_KEYS)
    return tuple(f"probe/{k}" for k in dict.fromkeys(keys))

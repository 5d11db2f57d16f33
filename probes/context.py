"""The regime-agnostic probe layer: ``Prober(config)(ctx) -> {"probe/...": float}`` on a cadence.

The trainer fills a :class:`ProbeContext` (trainable params, the exact loss it steps on, frozen probe chunks,
optimizer, η); the prober measures without side effects: parameter values, ``.grad``, optimizer state, the
torch/numpy/python RNG states and every module's train/eval flag are as before. Every random draw comes from a
private ``torch.Generator`` seeded from (config.seed, step).
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .blocks import DEFAULT_BLOCK_PATTERNS, parameter_blocks
from .eigs import STOPS, top_eigenvalues
from .hvp import MODES, HessianOperator
from .sharpness import (adam_preconditioner, batch_sharpness, block_lambda_max, flat_update, hutchinson_trace,
                        preconditioned_operator, rayleigh_pair, stability_thresholds)

__all__ = ["ProbeContext", "ProbeConfig", "Prober", "preserved_state"]


@dataclass
class ProbeContext:
    params: dict[str, torch.Tensor]        # named parameters being optimised (LoRA adapters only under LoRA)
    loss_fn: Callable[[Any], torch.Tensor] # loss of one chunk; chunk losses SUM to the full probe-batch loss
    batches: Sequence[Any]                 # frozen chunks of the probe batch (PPO: one rollout buffer)
    lr: float                              # η of the optimizer step (first param group)
    step: int = 0
    optimizer: torch.optim.Optimizer | None = None
    model: torch.nn.Module | None = None
    sample_batch: Callable[[torch.Generator], Sequence[Any]] | None = None
    update: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class ProbeConfig:
    """Cadence (in optimizer steps; 0 = off) and tolerances. ``every=0`` disables probing altogether.

    Defaults keep the probes near 10 % of a run's time (experiments/bench/probe_overhead.py): a warm λ_max solve
    (graph ≈1.3 G + 2–4 HVPs at ≈2 G each) plus update and step sharpness (1 HVP each) costs ≈11 probe-batch
    gradients, so every 250 steps is ≈4 %; batch sharpness + GNI (≤16 draws, ≈5 G each) every 1000 steps is ≈4 %.
    This is about the EoSS cadence (every 256 steps); short runs and the demo set denser cadences explicitly.
    """
    every: int = 250                       # λ_max (+ thresholds, update/step sharpness, Adam λ_max)
    k: int = 1                             # eigenvalues per solve (probe/lambda_max, probe/lambda_2, ...)
    tol: float = 1e-3                      # LOBPCG relative residual (stop="residual") or λ error (stop="eigenvalue")
    stop: str = "eigenvalue"               # eigen-solve stop rule, see probes.eigs: λ within tol, estimated (fewer
                                           # HVPs; a near-double λ₁ can end 1.5× outside it); "residual" bounds
                                           # |λ − θ| ≤ tol·|θ| for sure and converges the eigenvector too
    max_hvps: int = 40                     # per eigen-solve
    mode: str = "cache"                    # HVP mode: cache | recompute | fd
    warm_start: bool = True
    update_sharpness: bool = True
    step_sharpness: bool = True
    adam: bool = True                      # preconditioned λ_max when the optimizer is Adam-family
    batch_sharpness_every: int = 1000      # needs ctx.sample_batch
    batch_min_samples: int = 8
    batch_max_samples: int = 16
    batch_rse: float = 0.05
    batch_estimator: str = "ratio_of_means"   # which estimator the stop rule is on
    gni: bool = False                      # with batch sharpness: +1 full-batch HVP per draw (≈+40 % of its cost)
    confidence: float = 0.95
    trace_every: int = 0
    trace_max_probes: int = 32
    trace_rse: float = 0.05
    blocks_every: int = 0                  # per-block trace and λ_max (k·#blocks HVPs per solve)
    # with ctx.model set, fused Q/K/V matrices (block attn_qkv) are split into attn_qk / attn_vo
    block_patterns: tuple[tuple[str, str], ...] = DEFAULT_BLOCK_PATTERNS
    eval_mode: bool = True                 # probe in eval mode (dropout off, deterministic); flags restored
    seed: int = 0

    def __post_init__(self):
        for name in ("every", "batch_sharpness_every", "trace_every", "blocks_every", "k", "max_hvps"):
            if getattr(self, name) < 0:
                raise ValueError(f"ProbeConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.mode not in MODES:
            raise ValueError(f"ProbeConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.batch_estimator not in ("ratio_of_means", "mean_of_ratios"):
            raise ValueError(f"ProbeConfig.batch_estimator invalid: {self.batch_estimator!r}")
        if not 0 < self.confidence < 1 or self.tol <= 0:
            raise ValueError("ProbeConfig: need 0 < confidence < 1 and tol > 0")
        if self.stop not in STOPS:
            raise ValueError(f"ProbeConfig.stop must be one of {STOPS}, got {self.stop!r}")
        if self.every > 0 and (self.k < 1 or self.max_hvps < self.k):
            raise ValueError("ProbeConfig: need k >= 1 and max_hvps >= k")
        if not 1 <= self.batch_min_samples <= self.batch_max_samples:
            raise ValueError("ProbeConfig: need 1 <= batch_min_samples <= batch_max_samples")


@contextlib.contextmanager
def preserved_state(model: torch.nn.Module | None, eval_mode: bool):
    """Save and restore the global RNG states and each module's training flag; enable grad inside."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_state, py_state = np.random.get_state(), random.getstate()
    flags = [(m, m.training) for m in model.modules()] if model is not None else []
    try:
        if model is not None and eval_mode:
            model.eval()
        with torch.enable_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)


class Prober:
    """Stateful probe schedule: keeps the last eigenvectors for warm starts."""

    def __init__(self, config: ProbeConfig = ProbeConfig()):
        self.config = config
        self._warm: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The warm-start eigenvectors as ``{"warm.<solve>": tensor}`` (safetensors-ready), all a resumed run needs
        to probe as if it had never stopped: every random draw comes from a generator seeded by (seed, step)."""
        return {f"warm.{k}": v for k, v in self._warm.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`; vectors move to the operator's device when used."""
        self._warm = {k[len("warm."):]: v for k, v in state.items() if k.startswith("warm.")}

    def _due(self, every: int, step: int) -> bool:
        return self.config.every > 0 and every > 0 and step % every == 0

    def due(self, step: int) -> bool:
        c = self.config
        return any(self._due(e, step) for e in (c.every, c.batch_sharpness_every, c.trace_every, c.blocks_every))

    def _init(self, key: str, op: HessianOperator):
        v = self._warm.get(key) if self.config.warm_start else None
        return v.to(op.device) if v is not None and v.shape[0] == op.dim else None

    def __call__(self, ctx: ProbeContext) -> dict[str, float]:
        c, step = self.config, int(ctx.step)
        if not self.due(step):
            return {}
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed((c.seed * 1_000_003 + step) % (2 ** 63))
        out: dict[str, float] = {}
        with preserved_state(ctx.model, c.eval_mode):
            op = HessianOperator(ctx.params, ctx.loss_fn, ctx.batches, mode=c.mode, model=ctx.model)
            hvps = 0
            if self._due(c.every, step):
                if ctx.lr > 0:   # η = 0 (e.g. a warm-up step) has no stability threshold
                    out.update({f"probe/{k}": v for k, v in stability_thresholds(ctx.optimizer, ctx.lr).items()})
                # Step and update sharpness first: on a warm solve their HVPs (g, Hg) and (Δθ, HΔθ) join the first
                # Rayleigh–Ritz beside the last eigenvector, for free (it maximises θ, so they only help). A cold
                # solve starts from a random vector alone: beside it, a g inside an invariant subspace that misses
                # the top eigenvector would win the first Rayleigh–Ritz and trap the solve (tests/test_probes_context).
                known: list[tuple[torch.Tensor, torch.Tensor]] = []
                if c.step_sharpness:
                    out["probe/step_sharpness"], g, hg = rayleigh_pair(op, op.gradient())
                    known.append((g, hg))
                if c.update_sharpness and ctx.update is not None:
                    out["probe/update_sharpness"], u, hu = rayleigh_pair(op, flat_update(ctx.update, op.names))
                    known.append((u, hu))
                init = self._init("H", op)
                pairs = (torch.stack([v for v, _ in known], 1), torch.stack([a for _, a in known], 1)) \
                    if known and init is not None else None
                res = top_eigenvalues(op, k=c.k, tol=c.tol, init=init, max_hvps=c.max_hvps, generator=gen,
                                      stop=c.stop, known=pairs)
                self._warm["H"] = res.vectors.detach()
                out["probe/lambda_max"] = float(res.values[0])
                for i in range(1, len(res.values)):
                    out[f"probe/lambda_{i + 1}"] = float(res.values[i])
                out["probe/converged"] = float(res.converged)
                if c.adam and ctx.optimizer is not None and "probe/adam_threshold" in out:
                    pre = adam_preconditioner(ctx.optimizer, op.params, ctx.lr)
                    if pre is not None:
                        ares = top_eigenvalues(preconditioned_operator(op, pre), k=1, tol=c.tol,
                                               init=self._init("adam", op), max_hvps=c.max_hvps, generator=gen,
                                               stop=c.stop)
                        self._warm["adam"] = ares.vectors.detach()
                        out["probe/adam_lambda_max"] = float(ares.values[0])
                        out["probe/converged"] = float(res.converged and ares.converged)
            if self._due(c.batch_sharpness_every, step) and ctx.sample_batch is not None:
                bs = batch_sharpness(ctx.params, ctx.loss_fn, ctx.sample_batch, gen, min_samples=c.batch_min_samples,
                                     max_samples=c.batch_max_samples, rse=c.batch_rse, estimator=c.batch_estimator,
                                     confidence=c.confidence, mode=c.mode, model=ctx.model,
                                     full_op=op if c.gni else None)
                # bs.hvps also counts the GNI HVPs on op, which op.hvps adds below
                hvps += bs.hvps - len(bs.samples.get("gHfull_g", []))
                out.update({"probe/batch_sharpness": bs.ratio_of_means, "probe/batch_sharpness_ci_lo": bs.rom_ci[0],
                            "probe/batch_sharpness_ci_hi": bs.rom_ci[1], "probe/batch_sharpness_n": float(bs.n),
                            "probe/batch_sharpness_mor": bs.mean_of_ratios,
                            "probe/batch_sharpness_mor_ci_lo": bs.mor_ci[0],
                            "probe/batch_sharpness_mor_ci_hi": bs.mor_ci[1]})
                if c.gni:
                    out["probe/gni"] = bs.gni
            blocks = None
            if self._due(c.trace_every, step) or self._due(c.blocks_every, step):
                # shapes + model config let fused Q/K/V matrices split into attn_qk / attn_vo
                blocks = parameter_blocks(op.names, [p.numel() for p in op.params], c.block_patterns,
                                          shapes=[p.shape for p in op.params],
                                          config=getattr(ctx.model, "config", None))
            if self._due(c.trace_every, step):
                tr = hutchinson_trace(op, gen, max_probes=c.trace_max_probes, min_probes=min(8, c.trace_max_probes),
                                      rse=c.trace_rse, blocks=blocks)
                out["probe/trace"] = tr.trace
                for b, v in tr.blocks.items():
                    out[f"probe/block/{b}/trace"] = v
                    out[f"probe/block/{b}/trace_per_param"] = v / int(blocks[b].numel())
            if self._due(c.blocks_every, step):
                for b, r in block_lambda_max(op, blocks, tol=c.tol, max_hvps=c.max_hvps, generator=gen).items():
                    out[f"probe/block/{b}/lambda_max"] = float(r.values[0])
            hvps += op.hvps
            op.release()
        out["probe/hvps"] = float(hvps)
        out["probe/seconds"] = time.perf_counter() - t0
        return out

"""The regime-agnostic probe schedule: ``Prober(config)(ctx) -> {"probe/...": float}`` on a cadence.

At a due step the Prober builds one :class:`~probes.hvp.HessianOperator` on the fixed probe set (``ctx.probe_set``,
else ``ctx.batches``) and, when that is not the current batch, one on ``ctx.batches`` (graphs are built lazily, on
first use), runs every due kind of :data:`probes.registry.PROBES` on them in registry order inside
:func:`~probes.context.preserved_state` (no side effects), and adds ``probe/hvps`` (over all operators) and
``probe/seconds`` (and ``probe/<kind>_seconds`` per kind). It keeps the warm-start eigenvectors
between probe steps. Every random draw comes from a private ``torch.Generator`` seeded from (config.seed, step), so
a resumed run probes as if it had never stopped.
"""
from __future__ import annotations

import time

import torch

from .config import ProbeConfig
from .context import ProbeContext, preserved_state
from .hvp import HessianOperator
from .registry import PROBES, ProbeStep

__all__ = ["Prober"]


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

    def _due(self, cadence: str, step: int) -> bool:
        every = getattr(self.config, cadence)
        return self.config.every > 0 and every > 0 and step % every == 0

    def due(self, step: int) -> bool:
        return any(self._due(kind.cadence, step) for kind in PROBES)

    def __call__(self, ctx: ProbeContext) -> dict[str, float]:
        c, step = self.config, int(ctx.step)
        due = [kind for kind in PROBES if self._due(kind.cadence, step)]
        if not due:
            return {}
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed((c.seed * 1_000_003 + step) % (2 ** 63))
        with preserved_state(ctx.model, c.eval_mode):
            probe_set = ctx.batches if ctx.probe_set is None else ctx.probe_set
            op = HessianOperator(ctx.params, ctx.loss_fn, probe_set, mode=c.mode, model=ctx.model,
                                 cache_mb=c.cache_mb)
            batch_op = op if probe_set is ctx.batches else \
                HessianOperator(ctx.params, ctx.loss_fn, ctx.batches, mode=c.mode, model=ctx.model,
                                cache_mb=c.cache_mb)
            run = ProbeStep(ctx, c, op, gen, self._warm, batch_op=batch_op)
            for kind in due:
                t_kind = time.perf_counter()
                run.out.update(kind.measure(run))
                run.out[f"{kind.name}_seconds"] = time.perf_counter() - t_kind
            hvps = run.other_hvps + op.hvps + (batch_op.hvps if batch_op is not op else 0)
            if c.mode == "cache" and op.gradient_evals:   # the probe set's graph was built: how much of it fit
                run.out["cached_chunks"] = float(op.cached_chunks)
            op.release()
            batch_op.release()
        out = {f"probe/{k}": v for k, v in run.out.items()}
        out["probe/hvps"] = float(hvps)
        out["probe/seconds"] = time.perf_counter() - t0
        return out

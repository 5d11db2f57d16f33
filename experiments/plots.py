"""Figures from run directories: one figure per sweep group, overlaying learning rates.

Panels (each only when some run logged the metric):
  λ_max vs step (log scale) with each run's threshold θ as a dashed line of the same colour (2/η for GD,
  (2+2β)/η with momentum β); batch sharpness vs the same threshold; the Adam-preconditioned λ_max vs
  (2+2β₁)/((1-β₁)η); η·λ_max vs step with horizontal lines at the edge values (2, 2+2β); train loss;
  reward/accuracy; retention perplexity.
Matplotlib's Agg backend is forced: reports are built headless.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.rundirs import Run  # noqa: E402


def lr_label(run: Run) -> str:
    return f"η={run.lr:.2g}" if np.isfinite(run.lr) else run.name


def _colors(n: int):
    cmap = plt.get_cmap("viridis")
    return [cmap(x) for x in (np.linspace(0.0, 0.8, n) if n > 1 else [0.0])]


def _sharpness_panel(ax, runs, colors, key, title):
    for run, c in zip(runs, colors):
        s, v = run.series(key)
        if not len(s):
            continue
        ax.plot(s, v, "o-", ms=3, lw=1.3, color=c, label=lr_label(run))
        ts, tv = run.threshold(key)
        if len(ts):
            ax.plot(ts, tv, "--", lw=1.0, color=c, alpha=0.8)
        lo_s, lo = run.series(key + "_ci_lo")
        hi_s, hi = run.series(key + "_ci_hi")
        if len(lo) and len(lo) == len(hi) and np.array_equal(lo_s, hi_s):
            ax.fill_between(lo_s, lo, hi, color=c, alpha=0.15, lw=0)
    _log_if_positive(ax, symlog=True)
    ax.set_title(title)
    ax.set_xlabel("step")


def _log_if_positive(ax, symlog: bool = False) -> None:
    """Log y-axis when every plotted value is > 0 (a PPO surrogate loss or a negative λ would vanish on it);
    with ``symlog``, a symmetric log axis otherwise (sharpness estimates that dip below zero)."""
    ys = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    ys = [y[np.isfinite(y)] for y in ys if len(y)]
    ys = [y for y in ys if len(y)]
    if ys and all(y.min() > 0 for y in ys):
        ax.set_yscale("log")
    elif ys and symlog:
        ax.set_yscale("symlog", linthresh=1.0)


def _edge_panel(ax, runs, colors):
    edges = set()
    for run, c in zip(runs, colors):
        key = "probe/lambda_max"
        s, v = run.series(key)
        if not len(s):
            continue
        ax.plot(s, run.eta(s) * v, "o-", ms=3, lw=1.3, color=c, label=lr_label(run))
        edges.add(round(run.edge(key), 6))
    edges.add(2.0)
    lines = [ax.axhline(e, color="k", ls="--" if e == 2.0 else ":", lw=1.0) for e in sorted(edges)]
    ax.legend(lines, [f"η·λ = {e:g}" for e in sorted(edges)], fontsize=8, loc="best")
    _log_if_positive(ax, symlog=True)  # catapults reach 1000× the edge; on a log axis the edge stays readable
    ax.set_title("η·λ_max (edge: 2 for GD, 2+2β with momentum)")
    ax.set_xlabel("step")


def _curve_panel(ax, runs, colors, keys, title, logy=False):
    for run, c in zip(runs, colors):
        for key, style in zip(keys, ("-", "--", ":")):
            s, v = run.series(key)
            if len(s):
                ax.plot(s, v, style, lw=1.2, color=c)
    if len(keys) > 1:  # line styles tell the metrics apart
        styles = [plt.Line2D([], [], color="gray", ls=st) for st in ("-", "--", ":")[: len(keys)]]
        ax.legend(styles, keys, fontsize=8)
    if logy:
        _log_if_positive(ax)
    ax.set_title(title)
    ax.set_xlabel("step")


def sweep_figure(runs: list[Run], title: str, path: Path) -> Path:
    """Write one PNG overlaying the runs of a sweep group (sorted by η, one colour per run)."""
    runs = sorted(runs, key=lambda r: (r.lr, r.name))
    colors = _colors(len(runs))
    has = lambda key: any(r.has(key) for r in runs)  # noqa: E731
    panels = []
    if has("probe/lambda_max"):
        panels.append(lambda ax: _sharpness_panel(ax, runs, colors, "probe/lambda_max", "λ_max (dashed: threshold θ)"))
    if has("probe/batch_sharpness"):
        panels.append(
            lambda ax: _sharpness_panel(ax, runs, colors, "probe/batch_sharpness", "batch sharpness (dashed: θ)")
        )
    if has("probe/adam_lambda_max"):
        panels.append(
            lambda ax: _sharpness_panel(
                ax, runs, colors, "probe/adam_lambda_max", "preconditioned λ_max (dashed: (2+2β₁)/((1-β₁)η))"
            )
        )
    if has("probe/lambda_max"):
        panels.append(lambda ax: _edge_panel(ax, runs, colors))
    if has("train/loss"):
        panels.append(lambda ax: _curve_panel(ax, runs, colors, ["train/loss"], "train loss", logy=True))
    perf = [k for k in ("env/reward_mean", "eval/accuracy", "env/accuracy") if has(k)]
    if perf:
        panels.append(lambda ax: _curve_panel(ax, runs, colors, perf, "reward / accuracy"))
    if has("retention/perplexity"):
        panels.append(
            lambda ax: _curve_panel(ax, runs, colors, ["retention/perplexity"], "retention perplexity (held-out)",
                                    logy=True)
        )
    if not panels:
        raise ValueError(f"{title}: no plottable metric in {[r.name for r in runs]}")
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.6 * nrow + 0.8), squeeze=False, layout="constrained")
    for ax, draw in zip(axes.flat, panels):
        draw(ax)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, lw=2) for c in colors]
    labels = [lr_label(r) + (" (diverged)" if r.status.get("status") == "diverged" else "") for r in runs]
    fig.legend(handles, labels, loc="outside upper center", ncol=min(8, len(labels)), frameon=False, fontsize=10,
               title=title, title_fontproperties={"size": 12, "weight": "bold"})
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

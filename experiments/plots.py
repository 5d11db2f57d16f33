"""Figures from run directories: one figure per sweep group, overlaying learning rates.

Panels (each only when some run logged the metric), one row of panels per optimizer setting (sgd, sgd β=0.9,
adamw ...: their thresholds differ, so they never share an axis):
  λ_max vs step with each run's threshold θ as a dashed line of the same colour (2/η for GD, (2+2β)/η with
  momentum β); batch sharpness vs the same threshold; the Adam-preconditioned λ_max vs (2+2β₁)/((1-β₁)η);
  η·λ_max vs step with horizontal lines at the edge values (2, 2+2β); train loss; reward/accuracy; retention
  perplexity.
Colour = η, line style = whatever else differs between runs of the same η (seed, weight decay, ...); legend labels
name exactly the fields that differ within the figure, so no two entries read alike.
Readable with outliers: y-limits come from Tukey fences (quartiles ± 3 IQR, in log space for positive data) that
always include the thresholds; points beyond them are drawn as ▲/▼ on the axis edge and counted in the title.
Log axes for positive data spanning ≥ 10×, symlog where values change sign (batch sharpness can dip below zero).
Matplotlib's Agg backend is forced: reports are built headless.
"""

from __future__ import annotations

import math

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.rundirs import Run  # noqa: E402

FENCE = 3.0  # Tukey's "far out" fence: beyond quartile ± 3 IQR a point is clipped to the axis edge
STYLES = ("-", "--", ":", "-.")


def optim_setting(run: Run) -> str:
    """The optimizer setting that fixes the threshold: 'sgd', 'sgd β=0.9', 'adamw' ..."""
    return run.optimizer + (f" β={run.momentum:g}" if run.momentum else "")


def _fields(run: Run) -> dict[str, str]:
    """Candidate legend fields, in the order they are shown."""
    get = run._get
    return {
        "optim": optim_setting(run),
        "wd": f"wd={get('optim', 'weight_decay', default='')}",
        "batch": f"batch={get('train', 'batch', default=get('train', 'micro_batch', default=''))}"
                 f"×{get('train', 'grad_accum', default=1)}",
        "seed": f"seed={get('train', 'seed', default=get('seed', default=''))}",
    }


def run_labels(runs: list[Run]) -> list[str]:
    """One legend label per run: η, plus the fields that differ between the runs, plus the run name if two labels
    would still read alike."""
    fields = [_fields(r) for r in runs]
    varying = [k for k in (fields[0] if fields else {}) if len({f[k] for f in fields}) > 1]
    labels = [" · ".join([lr_label(r)] + [f[k] for k in varying]) for r, f in zip(runs, fields)]
    return [f"{lab} ({r.name})" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]


def lr_label(run: Run) -> str:
    return f"η={run.lr:.2g}" if np.isfinite(run.lr) else run.name


def _colors(n: int):
    cmap = plt.get_cmap("viridis")
    return [cmap(x) for x in (np.linspace(0.0, 0.8, n) if n > 1 else [0.0])]


def run_styles(runs: list[Run]) -> list[tuple]:
    """(colour, line style) per run: colour by η, style by rank among the runs sharing that η."""
    def key(r: Run) -> float:  # NaN ≠ NaN, so runs without a known η share the key inf (drawn last)
        return r.lr if np.isfinite(r.lr) else math.inf

    keys = sorted({key(r) for r in runs})
    cmap = dict(zip(keys, _colors(len(keys))))
    seen: dict[float, int] = {}
    out = []
    for r in runs:
        i = seen.get(key(r), 0)
        seen[key(r)] = i + 1
        out.append((cmap[key(r)], STYLES[i % len(STYLES)]))
    return out


def robust_limits(values, keep=()) -> tuple[float, float]:
    """(lo, hi) covering the data within Tukey's far-out fences (quartiles ± FENCE·IQR; on log10 for all-positive
    data) and every value in ``keep`` (the thresholds)."""
    y = np.asarray(values, dtype=float)
    y = y[np.isfinite(y)]
    k = np.asarray(keep, dtype=float)
    k = k[np.isfinite(k)]
    if not len(y):
        return (float(k.min()), float(k.max())) if len(k) else (0.0, 1.0)
    positive = bool((y > 0).all() and (k > 0).all())
    f = np.log10 if positive else (lambda v: v)
    q1, q3 = np.percentile(f(y), [25, 75])
    lo_f, hi_f = q1 - FENCE * (q3 - q1), q3 + FENCE * (q3 - q1)
    inside = y[(f(y) >= lo_f) & (f(y) <= hi_f)]
    both = np.concatenate([inside, k])
    return float(both.min()), float(both.max())


def _finish_axis(ax, values, keep=(), symlog=True) -> None:
    """Set a log (positive data spanning ≥ 10×) / symlog (sign changes) / linear y-axis with robust limits; the
    clipped points leave their line (so it does not run off the axis) and reappear as ▲/▼ on the edge."""
    y = np.concatenate([np.asarray(v, dtype=float) for v, *_ in values]) if values else np.zeros(0)
    lo, hi = robust_limits(y, keep)
    if lo == hi:
        lo, hi = (lo / 2, hi * 2) if lo > 0 else (lo - 1, hi + 1)
    if lo > 0 and hi / lo >= 10:
        ax.set_yscale("log")
        ylo, yhi = lo / (hi / lo) ** 0.05, hi * (hi / lo) ** 0.05
    else:
        pad = 0.05 * (hi - lo)
        ylo, yhi = lo - pad, hi + pad
        if symlog and lo < 0 < hi:
            ax.set_yscale("symlog", linthresh=max(0.01 * max(abs(lo), abs(hi)), 1e-12))
    ax.set_ylim(ylo, yhi)
    clipped = 0
    for v, s, c, line in values:
        v, s = np.asarray(v, dtype=float), np.asarray(s, dtype=float)
        off = (v > yhi) | (v < ylo)
        if off.any():
            line.set_ydata(np.where(off, np.nan, v))
        for mask, edge, marker in ((v > yhi, yhi, "^"), (v < ylo, ylo, "v")):
            if mask.any():
                ax.plot(s[mask], np.full(mask.sum(), edge), marker, ms=7, color=c, clip_on=False, ls="none")
                clipped += int(mask.sum())
    if clipped:
        ax.set_title(f"{ax.get_title()}\n({clipped} point{'s' * (clipped > 1)} off-scale: ▲▼)", fontsize=10)


def _sharpness_panel(ax, runs, styles, key, title):
    values, keep = [], []
    for run, (c, ls) in zip(runs, styles):
        s, v = run.series(key)
        if not len(s):
            continue
        (line,) = ax.plot(s, v, "o", ls=ls, ms=3, lw=1.3, color=c)
        values.append((v, s, c, line))
        ts, tv = run.threshold(key)
        if len(ts):
            ax.plot(ts, tv, "--", lw=1.0, color=c, alpha=0.8)
            keep.extend(tv)
        lo_s, lo = run.series(key + "_ci_lo")
        hi_s, hi = run.series(key + "_ci_hi")
        if len(lo) and len(lo) == len(hi) and np.array_equal(lo_s, hi_s):
            ax.fill_between(lo_s, lo, hi, color=c, alpha=0.15, lw=0)
    ax.set_title(title)
    ax.set_xlabel("step")
    _finish_axis(ax, values, keep)


def _edge_panel(ax, runs, styles):
    edges, values = set(), []
    for run, (c, ls) in zip(runs, styles):
        key = "probe/lambda_max"
        s, v = run.series(key)
        if not len(s):
            continue
        (line,) = ax.plot(s, run.eta(s) * v, "o", ls=ls, ms=3, lw=1.3, color=c)
        values.append((run.eta(s) * v, s, c, line))
        edges.add(round(run.edge(key), 6))
    edges.add(2.0)
    lines = [ax.axhline(e, color="k", ls="--" if e == 2.0 else ":", lw=1.0) for e in sorted(edges)]
    ax.legend(lines, [f"η·λ = {e:g}" for e in sorted(edges)], fontsize=8, loc="best")
    ax.set_title("η·λ_max (edge: 2 for GD, 2+2β with momentum)")
    ax.set_xlabel("step")
    _finish_axis(ax, values, sorted(edges))  # catapults reach 1000× the edge: clipped, so the edge stays readable


def _curve_panel(ax, runs, styles, keys, title, logy=False):
    values = []
    for run, (c, ls) in zip(runs, styles):
        for key, style in zip(keys, STYLES):
            s, v = run.series(key)
            if len(s):
                (line,) = ax.plot(s, v, ls=style if len(keys) > 1 else ls, lw=1.2, color=c)
                values.append((v, s, c, line))
    if len(keys) > 1:  # line styles tell the metrics apart
        handles = [plt.Line2D([], [], color="gray", ls=st) for st in STYLES[: len(keys)]]
        ax.legend(handles, keys, fontsize=8)
    ax.set_title(title)
    ax.set_xlabel("step")
    if logy:
        _finish_axis(ax, values, symlog=False)


def _panels(runs, styles) -> list:
    """The panels (drawing functions) for one optimizer setting's runs."""
    has = lambda key: any(r.has(key) for r in runs)  # noqa: E731
    panels = []
    if has("probe/lambda_max"):
        panels.append(lambda ax: _sharpness_panel(ax, runs, styles, "probe/lambda_max", "λ_max (dashed: threshold θ)"))
    if has("probe/batch_sharpness"):
        panels.append(lambda ax: _sharpness_panel(ax, runs, styles, "probe/batch_sharpness",
                                                  "batch sharpness (dashed: θ)"))
    if has("probe/adam_lambda_max"):
        panels.append(lambda ax: _sharpness_panel(ax, runs, styles, "probe/adam_lambda_max",
                                                  "preconditioned λ_max (dashed: (2+2β₁)/((1-β₁)η))"))
    if has("probe/lambda_max"):
        panels.append(lambda ax: _edge_panel(ax, runs, styles))
    if has("train/loss"):
        panels.append(lambda ax: _curve_panel(ax, runs, styles, ["train/loss"], "train loss", logy=True))
    perf = [k for k in ("env/reward_mean", "eval/accuracy", "env/accuracy") if has(k)]
    if perf:
        panels.append(lambda ax: _curve_panel(ax, runs, styles, perf, "reward / accuracy"))
    if has("retention/perplexity"):
        panels.append(lambda ax: _curve_panel(ax, runs, styles, ["retention/perplexity"],
                                              "retention perplexity (held-out)", logy=True))
    return panels


def build_figure(runs: list[Run], title: str):
    """The figure overlaying the runs of a sweep group: one block of panel rows per optimizer setting."""
    runs = sorted(runs, key=lambda r: (optim_setting(r), r.lr, r.name))
    styles = run_styles(runs)
    settings = list(dict.fromkeys(optim_setting(r) for r in runs))
    blocks = []  # (setting, panels)
    for setting in settings:
        idx = [i for i, r in enumerate(runs) if optim_setting(r) == setting]
        panels = _panels([runs[i] for i in idx], [styles[i] for i in idx])
        if panels:
            blocks.append((setting, panels))
    if not blocks:
        raise ValueError(f"{title}: no plottable metric in {[r.name for r in runs]}")
    ncol = min(3, max(len(p) for _, p in blocks))
    rows = [(setting, panels[i : i + ncol]) for setting, panels in blocks for i in range(0, len(panels), ncol)]
    fig, axes = plt.subplots(len(rows), ncol, figsize=(5.2 * ncol, 3.6 * len(rows) + 0.8), squeeze=False,
                             layout="constrained")
    for (setting, panels), row in zip(rows, axes):
        for ax, draw in zip(row, panels):
            draw(ax)
            if len(settings) > 1:
                ax.set_title(f"[{setting}] {ax.get_title()}")
            ax.grid(alpha=0.3)
        for ax in row[len(panels) :]:
            ax.axis("off")
    handles = [plt.Line2D([], [], color=c, ls=ls, lw=2) for c, ls in styles]
    labels = [lab + (" (diverged)" if r.status.get("status") == "diverged" else "")
              for lab, r in zip(run_labels(runs), runs)]
    fig.legend(handles, labels, loc="outside upper center", ncol=min(6, len(labels)), frameon=False, fontsize=10,
               title=title, title_fontproperties={"size": 12, "weight": "bold"})
    return fig


def sweep_figure(runs: list[Run], title: str, path: Path) -> Path:
    """Write one PNG overlaying the runs of a sweep group (see build_figure)."""
    fig = build_figure(runs, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

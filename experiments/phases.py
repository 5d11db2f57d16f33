"""Automatic Edge-of-Stability phase detection on one sharpness trajectory.

Input: probe steps t_i, sharpness λ_i (λ_max, batch sharpness, or the Adam-preconditioned λ_max) and the
stability threshold θ_i of the optimizer at that step: 2/η for GD, (2+2β)/η for heavy-ball momentum β (3.8/η at
β = 0.9, where 2/η would put the edge 1.9× too low), (2+2β₁)/((1-β₁)η) for Adam on the preconditioned Hessian.
Everything is measured on the normalised sharpness r_i = λ_i/θ_i (θ_i > 0), so r = 1 is the edge for any
optimizer; r may be negative (batch sharpness of an indefinite Hessian) and every rule below is sign-safe.

Rules (Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability";
catapult: Lewkowycz et al. 2020, "The large learning rate phase of deep learning: the catapult mechanism"):
- smoothing: m = running median of r over ``smooth`` probes; at the ends the window shifts inward instead of
  shrinking, so one bad eigen-solve, even at the first or last probe, never decides a crossing on its own.
- r₀ = r at the first probe (λ₀/θ₀).
- onset: first probe with m ≥ 1 − δ (the edge is reached, from below or from above).
- settle: first probe at or after the onset with m ≤ 1 + δ_over (a start above the edge has come down);
  time to edge = settle step − first probe step.
- catapult: r₀ > 1 + δ and m later falls below r₀/(1 + δ); when a loss curve is given, the loss must also rise on
  some step up to the probe where m has fallen (an unstable start shows in the loss; a lone high first probe
  does not).
- progressive-sharpening slope: Theil–Sen dλ/dt over the probes up to the onset (all probes without one),
  also as gain of r per 1000 steps (comparable across η); NaN for runs that start at or above the edge.
- band fraction: share of probes from the settle step on with |r − 1| ≤ δ; above fraction: share with r > 1 + δ.
- hover fraction: share of those probes with 1 − δ ≤ r ≤ 1 + δ_over (the "holds the edge" band; at EoS λ_max sits
  a little above 2/η: +5-10% in experiments/cohen2021.py, +15-19% for full-batch GD on the LM).
- overshoot: median r from the settle step on (from the onset if it never settles), minus 1.
- loss non-monotonicity: fraction of consecutive logged losses that go up from the onset on (whole run without
  one); GD below the edge decreases monotonically, so this is ~0 there and large at EoS.

Phase label, first rule that applies:
- "too-short": fewer than 3 finite probes.
- no onset: relative change c = (m_end − m_start) / max(min(m_start, m_end), floor) of the medians of the first and
  last quarter of r (floor keeps values near or below zero from dividing by ~0 or flipping the sign):
  "sharpening" if c ≥ ``min_sharpening``, "softening" if c ≤ −``min_sharpening``, else "flat".
- onset, never settles: "above-edge" (e.g. the raw λ_max under Adam, or a start above the edge that stays there).
- settled with fewer than ``min_settled`` probes after it: "inconclusive" (the run ended before the phase did).
- "eos" if the median r after settling is in [1 − δ, 1 + δ_over] and the hover fraction ≥ ``min_band_fraction``;
  otherwise "above-edge" (median > 1 + δ_over), "below-edge" (median < 1 − δ, e.g. a collapse after touching the
  edge) or "inconclusive" (median in the band, but r is mostly outside it: it swings across the edge).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LABELS = ("eos", "above-edge", "below-edge", "sharpening", "softening", "flat", "inconclusive", "too-short")


@dataclass(frozen=True)
class PhaseConfig:
    # band half-width δ relative to the threshold: the band is r ∈ [1-δ, 1+δ]. 0.15 because at EoS λ_max hovers a
    # few % above 2/η (Cohen et al. 2021 Fig. 1; +5-10% in our digits replication, experiments/cohen2021.py)
    delta: float = 0.15
    # upper tolerance of the hover band [1-δ, 1+δ_over]; None = 2δ. λ_max at EoS sits above θ more than below it
    # (measured: full-batch GD on the LM hovers at median 1.15-1.19 θ), so "holds the edge" allows more room above
    delta_over: float | None = None
    smooth: int = 3  # width of the running median applied to r before detecting crossings (1 = none)
    min_band_fraction: float = 0.5  # "eos" needs at least this share of post-settle probes in the hover band
    min_sharpening: float = 0.2  # "sharpening"/"softening" need a relative change of r of at least this
    min_settled: int = 3  # probes from the settle step on needed to call the phase at the edge
    floor: float = 0.05  # |r| scale below which relative changes are measured against this floor instead

    def __post_init__(self) -> None:
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"PhaseConfig.delta must be in (0, 1), got {self.delta}")
        if self.delta_over is not None and not self.delta_over > 0:
            raise ValueError(f"PhaseConfig.delta_over must be > 0, got {self.delta_over}")
        if self.smooth < 1 or self.smooth % 2 == 0:
            raise ValueError(f"PhaseConfig.smooth must be a positive odd integer, got {self.smooth}")
        if self.min_settled < 1 or not self.floor > 0:
            raise ValueError("PhaseConfig: need min_settled >= 1 and floor > 0")

    @property
    def over(self) -> float:
        return 2 * self.delta if self.delta_over is None else self.delta_over


@dataclass(frozen=True)
class Phases:
    phase: str
    onset_step: int | None  # first optimizer step with smoothed r ≥ 1-δ
    sharpening_slope: float  # Theil–Sen dλ/dstep up to the onset (λ units per step); nan when starting at/above the edge
    sharpening_rate: float  # dr/dstep·1000 up to the onset (threshold fractions per 1000 steps)
    band_fraction: float  # share of post-settle probes with |r-1| ≤ δ (nan without settling)
    above_fraction: float  # share of post-settle probes with r > 1+δ (nan without settling)
    max_ratio: float  # max r over the run
    final_ratio: float  # median r over the last quarter of the probes
    loss_up_fraction: float  # fraction of loss increases after the onset (whole run without one); nan w/o loss
    loss_drop: float  # loss at the onset (or first loss) minus final loss; > 0 means training still progressed
    r0: float = float("nan")  # r at the first probe
    catapult: bool = False  # started above the edge and came down (see module doc)
    settle_step: int | None = None  # first step at/after the onset with smoothed r ≤ 1+δ_over
    time_to_edge: float = float("nan")  # settle step − first probe step
    hover_fraction: float = float("nan")  # share of post-settle probes with 1-δ ≤ r ≤ 1+δ_over
    overshoot: float = float("nan")  # median post-settle r − 1


def running_median(x: np.ndarray, width: int) -> np.ndarray:
    """Running median over ``width`` points, centred; at the ends the window shifts inward (never shrinks), so an
    outlier at the first or last point is outvoted like any other. Shorter inputs: the median of all."""
    x = np.asarray(x, dtype=float)
    if width <= 1:
        return x.copy()
    if len(x) <= width:
        return np.full(len(x), np.median(x)) if len(x) else x.copy()
    h = width // 2
    starts = np.clip(np.arange(len(x)) - h, 0, len(x) - width)
    return np.array([np.median(x[s : s + width]) for s in starts])


def _slope(t: np.ndarray, y: np.ndarray) -> float:
    """Theil–Sen slope (median of the pairwise slopes; Sen 1968): exact on a line, and one bad eigen-solve among
    the probes moves it little (a least-squares fit is dragged by it)."""
    i, j = np.triu_indices(len(t), k=1)
    dt = t[j] - t[i]
    ok = dt != 0
    if not ok.any():
        return float("nan")
    return float(np.median((y[j] - y[i])[ok] / dt[ok]))


def relative_change(start: float, end: float, floor: float) -> float:
    """(end − start) / max(min(start, end), floor): symmetric (a rise by c and the fall back have the same |c|
    for positive values) and sign-safe (a rise from −0.5 to 0.3 is a large positive change, not a sign flip)."""
    return (end - start) / max(min(start, end), floor)


def detect_phases(
    steps,
    sharpness,
    threshold,
    loss_steps=None,
    loss=None,
    config: PhaseConfig = PhaseConfig(),
) -> Phases:
    """Detect the EoS phases of one run (rules in the module docstring).

    Args:
        steps: probe steps (optimizer steps), increasing.
        sharpness: λ at those steps (non-finite entries are dropped).
        threshold: the stability threshold θ at those steps (array) or a constant.
        loss_steps, loss: the training-loss curve (any logging cadence); optional.
        config: band widths and decision rules.
    """
    t = np.asarray(steps, dtype=float)
    lam = np.asarray(sharpness, dtype=float)
    theta = np.broadcast_to(np.asarray(threshold, dtype=float), lam.shape)
    if t.shape != lam.shape:
        raise ValueError(f"steps and sharpness differ in length: {t.shape} vs {lam.shape}")
    keep = np.isfinite(lam) & np.isfinite(theta) & (theta > 0)
    t, lam, theta = t[keep], lam[keep], theta[keep]
    ls, lv = _loss_curve(loss_steps, loss)
    nan = float("nan")
    r = lam / theta
    if len(t) < 3:
        r0 = float(r[0]) if len(r) else nan
        return Phases("too-short", None, nan, nan, nan, nan, _max(r), nan, _up_fraction(lv), nan, r0=r0)

    d, over = config.delta, config.over
    m = running_median(r, config.smooth)
    r0 = float(r[0])
    quarter = max(1, len(r) // 4)
    final_ratio = float(np.median(r[-quarter:]))
    crossed = np.flatnonzero(m >= 1.0 - d)
    onset = int(crossed[0]) if len(crossed) else None
    settled = np.flatnonzero(m[onset:] <= 1.0 + over) + onset if onset is not None else np.zeros(0, int)
    settle = int(settled[0]) if len(settled) else None

    starts_above = m[0] > 1.0 + d
    slope = rate = nan
    if not starts_above:
        pre = slice(0, len(t) if onset is None else max(onset + 1, 2))
        slope = _slope(t[pre], lam[pre])
        rate = _slope(t[pre], r[pre]) * 1000.0

    fallen = np.flatnonzero(m[1:] < r0 / (1.0 + d)) + 1
    catapult = bool(r0 > 1.0 + d and len(fallen))
    if catapult and lv is not None and len(lv) > 1:
        early = lv[(ls >= t[0]) & (ls <= t[fallen[0]])]
        catapult = bool(len(early) > 1 and np.any(np.diff(early) > 0))

    band = above = hover = overshoot = nan
    if onset is None:
        change = relative_change(float(np.median(r[:quarter])), final_ratio, config.floor)
        if change >= config.min_sharpening:
            phase = "sharpening"
        elif change <= -config.min_sharpening:
            phase = "softening"
        else:
            phase = "flat"
    elif settle is None:
        phase = "above-edge"
        overshoot = float(np.median(r[onset:])) - 1.0
    else:
        post = r[settle:]
        band = float(np.mean(np.abs(post - 1.0) <= d))
        above = float(np.mean(post > 1.0 + d))
        hover = float(np.mean((post >= 1.0 - d) & (post <= 1.0 + over)))
        level = float(np.median(post))
        overshoot = level - 1.0
        if len(post) < config.min_settled:
            phase = "inconclusive"
        elif level > 1.0 + over:
            phase = "above-edge"
        elif level < 1.0 - d:
            phase = "below-edge"
        elif hover >= config.min_band_fraction:
            phase = "eos"
        else:
            phase = "inconclusive"

    loss_from = -np.inf if onset is None else t[onset]
    if lv is not None:
        after = ls >= loss_from
        up = _up_fraction(lv[after])
        drop = float(lv[after][0] - lv[-1]) if after.any() else nan
    else:
        up = drop = nan
    onset_step = None if onset is None else int(t[onset])
    settle_step = None if settle is None else int(t[settle])
    return Phases(
        phase, onset_step, slope, rate, band, above, float(r.max()), final_ratio, up, drop,
        r0=r0, catapult=catapult, settle_step=settle_step,
        time_to_edge=nan if settle is None else float(t[settle] - t[0]), hover_fraction=hover, overshoot=overshoot,
    )


def _loss_curve(loss_steps, loss):
    if loss is None:
        return None, None
    lv = np.asarray(loss, dtype=float)
    ls = np.arange(len(lv), dtype=float) if loss_steps is None else np.asarray(loss_steps, dtype=float)
    keep = np.isfinite(lv)
    return ls[keep], lv[keep]


def _up_fraction(lv) -> float:
    if lv is None or len(lv) < 2:
        return float("nan")
    return float(np.mean(np.diff(lv) > 0))


def _max(x: np.ndarray) -> float:
    return float(x.max()) if len(x) else float("nan")

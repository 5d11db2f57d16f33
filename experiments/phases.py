"""Automatic Edge-of-Stability phase detection on one sharpness trajectory.

Input: probe steps t_i, sharpness λ_i (λ_max, batch sharpness, or the Adam-preconditioned λ_max) and the
stability threshold θ_i of the optimizer at that step (2/η for GD, (2+2β)/η for heavy-ball momentum β,
(2+2β₁)/((1-β₁)η) for Adam on the preconditioned Hessian). Everything is measured on the normalised
sharpness r_i = λ_i/θ_i, so r = 1 is the edge for any optimizer (for GD, r = η·λ/2).

Definitions (Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability"):
- onset: first probe step where the median-of-3 smoothed r reaches 1 - δ (for GD: η·λ ≥ 2·(1-δ)); the median
  filter keeps a single noisy eigenvalue estimate from declaring EoS early.
- progressive-sharpening slope: least-squares slope dλ/dt over the probe steps before the onset (all steps when
  there is no onset), in λ units per optimizer step; also reported as gain of r per 1000 steps, which is
  comparable across learning rates.
- band fraction: fraction of probe steps after the onset with |r - 1| ≤ δ (the run "hovers at the edge").
- loss non-monotonicity: fraction of consecutive logged losses that go up, after the onset (whole run without one);
  GD on a smooth loss below the edge decreases monotonically, so this is ~0 there and large at EoS.

The phase label is one of: "eos" (onset and band fraction ≥ `min_band_fraction`), "above-edge" (onset, but r
stays above the band, e.g. raw λ_max under Adam), "below-edge" (onset, but r falls back below the band),
"sharpening" (no onset, λ/θ grew by at least the fraction `min_sharpening` from the first to the last quarter
of the probes), "softening" (no onset, λ/θ fell by that fraction: common at the start of fine-tuning),
"flat" (neither), "too-short" (fewer than 3 probe points).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PhaseConfig:
    # band half-width δ relative to the threshold: EoS band is r ∈ [1-δ, 1+δ]. 0.15 because at EoS λ_max hovers a
    # few % above 2/η (Cohen et al. 2021 Fig. 1; +5-10% in our digits replication, experiments/cohen2021.py)
    delta: float = 0.15
    smooth: int = 3  # width of the running median applied to r before detecting the onset (1 = none)
    min_band_fraction: float = 0.5  # "eos" needs at least this fraction of post-onset probes in the band
    min_sharpening: float = 0.2  # "sharpening" needs r to grow by this fraction (median last / first quarter - 1)

    def __post_init__(self) -> None:
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"PhaseConfig.delta must be in (0, 1), got {self.delta}")
        if self.smooth < 1 or self.smooth % 2 == 0:
            raise ValueError(f"PhaseConfig.smooth must be a positive odd integer, got {self.smooth}")


@dataclass(frozen=True)
class Phases:
    phase: str
    onset_step: int | None  # first optimizer step with smoothed r ≥ 1-δ
    sharpening_slope: float  # dλ/dstep before the onset (λ units per step)
    sharpening_rate: float  # dr/dstep·1000 before the onset (threshold fractions per 1000 steps)
    band_fraction: float  # fraction of post-onset probes with |r-1| ≤ δ (nan without an onset)
    above_fraction: float  # fraction of post-onset probes with r > 1+δ (nan without an onset)
    max_ratio: float  # max r over the run
    final_ratio: float  # median r over the last quarter of the probes
    loss_up_fraction: float  # fraction of loss increases after the onset (whole run without one); nan w/o loss
    loss_drop: float  # loss at the onset (or first loss) minus final loss; > 0 means training still progressed

    def as_dict(self) -> dict:
        return asdict(self)


def running_median(x: np.ndarray, width: int) -> np.ndarray:
    """Centered running median; the window shrinks at the ends (no padding artefacts)."""
    if width <= 1:
        return x.copy()
    h = width // 2
    return np.array([np.median(x[max(0, i - h) : i + h + 1]) for i in range(len(x))])


def _slope(t: np.ndarray, y: np.ndarray) -> float:
    if len(t) < 2 or np.ptp(t) == 0:
        return float("nan")
    return float(np.polyfit(t.astype(float), y.astype(float), 1)[0])


def detect_phases(
    steps,
    sharpness,
    threshold,
    loss_steps=None,
    loss=None,
    config: PhaseConfig = PhaseConfig(),
) -> Phases:
    """Detect the EoS phases of one run.

    Args:
        steps: probe steps (optimizer steps), increasing.
        sharpness: λ at those steps (non-finite entries are dropped).
        threshold: the stability threshold θ at those steps (array) or a constant.
        loss_steps, loss: the training-loss curve (any logging cadence); optional.
        config: band width and decision rules.
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
    if len(t) < 3:
        return Phases("too-short", None, nan, nan, nan, nan, _max(lam / theta), nan, _up_fraction(lv), nan)

    d = config.delta
    r = lam / theta
    r_smooth = running_median(r, config.smooth)
    crossed = np.flatnonzero(r_smooth >= 1.0 - d)
    onset_idx = int(crossed[0]) if len(crossed) else None
    pre = slice(0, len(t) if onset_idx is None else max(onset_idx + 1, 2))
    slope = _slope(t[pre], lam[pre])
    rate = _slope(t[pre], r[pre]) * 1000.0
    final_ratio = float(np.median(r[-max(1, len(r) // 4) :]))

    if onset_idx is None:
        band = above = nan
        loss_from = -np.inf
        gained = final_ratio / float(np.median(r[: max(1, len(r) // 4)])) - 1.0
        if gained >= config.min_sharpening:
            phase = "sharpening"
        elif gained <= -config.min_sharpening / (1 + config.min_sharpening):  # the inverse change: r/(1+m)
            phase = "softening"
        else:
            phase = "flat"
    else:
        post = r[onset_idx:]
        band = float(np.mean(np.abs(post - 1.0) <= d))
        above = float(np.mean(post > 1.0 + d))
        loss_from = t[onset_idx]
        if band >= config.min_band_fraction:
            phase = "eos"
        elif above >= 1.0 - band - above:
            phase = "above-edge"
        else:
            phase = "below-edge"

    if lv is not None:
        after = ls >= loss_from
        up = _up_fraction(lv[after])
        drop = float(lv[after][0] - lv[-1]) if after.any() else nan
    else:
        up = drop = nan
    onset_step = None if onset_idx is None else int(t[onset_idx])
    return Phases(phase, onset_step, slope, rate, band, above, float(r.max()), final_ratio, up, drop)


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

"""EoS phase detection on synthetic trajectories whose answers are known by construction."""

import math

import numpy as np
import pytest

from experiments.phases import PhaseConfig, detect_phases, running_median

ETA = 0.01
THETA = 2 / ETA  # 200
STEPS = np.arange(0, 1001, 10)
D10 = PhaseConfig(delta=0.1)  # the expected onsets below are for a band of ±10%


def saturating_ramp(steps, lam0=20.0, slope=0.5, cap=THETA, wiggle=0.03):
    """λ rises linearly at `slope` per step, then hovers at `cap` with a ±wiggle relative oscillation."""
    lam = np.minimum(lam0 + slope * steps, cap)
    at_cap = lam0 + slope * steps >= cap
    return np.where(at_cap, cap * (1 + wiggle * np.sin(steps / 7.0)), lam)


def eos_loss(steps, onset):
    """Smooth decay before `onset`, then decay plus a period-2 oscillation (non-monotone but decreasing)."""
    base = np.exp(-steps / 400.0)
    osc = np.where(steps >= onset, 0.02 * (-1.0) ** steps, 0.0)
    return base + osc


def test_ramp_that_saturates_at_two_over_eta_is_eos():
    lam = saturating_ramp(STEPS)
    # r = λ/θ first reaches 1 - δ = 0.9 at λ = 180, i.e. 20 + 0.5 t = 180 → t = 320
    loss_steps = np.arange(0, 1001)
    p = detect_phases(STEPS, lam, THETA, loss_steps, eos_loss(loss_steps, 360), D10)
    assert p.phase == "eos"
    assert p.onset_step == 320
    assert p.sharpening_slope == pytest.approx(0.5, rel=1e-6)
    assert p.sharpening_rate == pytest.approx(0.5 / THETA * 1000, rel=1e-6)
    assert p.band_fraction == 1.0 and p.above_fraction == 0.0
    assert p.max_ratio == pytest.approx(1.03, abs=1e-3)
    # from t = 320 on: 40 smooth decreasing steps, then an up step every other step
    assert 0.4 < p.loss_up_fraction < 0.5
    assert p.loss_drop > 0


def test_ramp_that_never_reaches_the_edge_is_sharpening():
    lam = 20.0 + 0.1 * STEPS  # max 120 < 180
    loss_steps = np.arange(0, 1001)
    p = detect_phases(STEPS, lam, THETA, loss_steps, np.exp(-loss_steps / 400.0))
    assert p.phase == "sharpening"
    assert p.onset_step is None
    assert p.sharpening_slope == pytest.approx(0.1, rel=1e-6)
    assert math.isnan(p.band_fraction)
    assert p.max_ratio == pytest.approx(0.6)
    assert p.loss_up_fraction == 0.0  # monotone decrease


def test_noisy_ramp_with_an_early_outlier():
    rng = np.random.default_rng(0)
    lam = saturating_ramp(STEPS, wiggle=0.0) * np.exp(0.04 * rng.standard_normal(len(STEPS)))
    lam[5] = 2.5 * THETA  # one bad eigen-solve at t = 50 must not declare EoS
    p = detect_phases(STEPS, lam, THETA, config=D10)
    assert p.phase == "eos"
    assert 290 <= p.onset_step <= 350
    assert p.band_fraction > 0.9
    assert p.sharpening_slope == pytest.approx(0.5, rel=0.35)  # the outlier biases the fit, it stays positive
    assert math.isnan(p.loss_up_fraction)  # no loss given


def test_without_smoothing_the_outlier_triggers_onset():
    lam = saturating_ramp(STEPS, wiggle=0.0)
    lam[5] = 2.5 * THETA
    assert detect_phases(STEPS, lam, THETA, config=PhaseConfig(delta=0.1, smooth=1)).onset_step == 50
    assert detect_phases(STEPS, lam, THETA, config=D10).onset_step == 320


def test_flat_softening_and_above_edge():
    assert detect_phases(STEPS, np.full(len(STEPS), 50.0), THETA).phase == "flat"
    # fine-tuning often starts sharp and relaxes: λ 160 → 40 below the edge
    assert detect_phases(STEPS, 160.0 - 0.12 * STEPS, THETA).phase == "softening"
    assert detect_phases(STEPS, 160.0 - 0.01 * STEPS, THETA).phase == "flat"  # -6%
    # raw λ_max under Adam keeps rising past the threshold
    p = detect_phases(STEPS, 100.0 + 0.5 * STEPS, THETA, config=D10)
    assert p.phase == "above-edge"
    assert p.onset_step == 160  # 100 + 0.5 t ≥ 180
    assert p.above_fraction == pytest.approx(76 / 85)  # t = 160..1000; in band while λ ≤ 220 (t ≤ 240)


def test_falls_back_below_the_edge():
    lam = np.where(STEPS < 300, 20 + 0.6 * STEPS, 60.0)  # touches 200 (r=1) then collapses (catapult)
    p = detect_phases(STEPS, lam, THETA)
    assert p.phase == "below-edge"
    assert p.band_fraction < 0.2


def test_time_varying_threshold_uses_the_ratio():
    # η decays 0.01 → 0.005, so θ = 2/η rises 200 → 400; λ tracks the threshold exactly: always at the edge
    eta = np.linspace(0.01, 0.005, len(STEPS))
    p = detect_phases(STEPS, 2 / eta, 2 / eta)
    assert p.phase == "eos" and p.onset_step == 0 and p.band_fraction == 1.0


def test_non_finite_probes_are_dropped_and_short_runs_flagged():
    lam = saturating_ramp(STEPS)
    lam[::7] = np.nan
    assert detect_phases(STEPS, lam, THETA).phase == "eos"
    assert detect_phases([0, 10], [1.0, 2.0], THETA).phase == "too-short"


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="delta"):
        PhaseConfig(delta=1.5)
    with pytest.raises(ValueError, match="odd"):
        PhaseConfig(smooth=2)
    with pytest.raises(ValueError, match="length"):
        detect_phases([0, 1, 2], [1.0, 2.0], THETA)


def test_running_median():
    x = np.array([1.0, 9.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(running_median(x, 3), [5.0, 2.0, 3.0, 3.0, 3.5])

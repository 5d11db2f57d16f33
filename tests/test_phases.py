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
    # the window shifts inward at the ends instead of shrinking (a shrunk window of 2 averaged the outlier 9 into
    # the first point: 5.0, the "single spike at the first probe sets the onset" bug of issue 11)
    np.testing.assert_array_equal(running_median(x, 3), [2.0, 2.0, 3.0, 3.0, 3.0])
    np.testing.assert_array_equal(running_median(x[:2], 3), [5.0, 5.0])  # shorter than the window: one median
    np.testing.assert_array_equal(running_median(x, 1), x)


# ---- issue 11: sign changes, single spikes, catapults, momentum thresholds, short runs ----


def test_batch_sharpness_rising_from_a_negative_start_is_sharpening():
    # r = λ/θ from -0.5 to 0.6 (never at the edge): the old ratio of quarter medians flipped sign ("softening")
    lam = THETA * np.linspace(-0.5, 0.6, len(STEPS))
    p = detect_phases(STEPS, lam, THETA)
    assert p.phase == "sharpening" and p.onset_step is None
    assert p.r0 == pytest.approx(-0.5)
    assert p.sharpening_rate == pytest.approx(1.1, rel=1e-6)  # +1.1 θ over 1000 steps
    # the same rise, continued to the edge and held there, is EoS
    rise = THETA * np.minimum(np.linspace(-0.5, 2.0, len(STEPS)), 1.0)
    q = detect_phases(STEPS, rise, THETA, config=D10)
    assert q.phase == "eos" and q.onset_step == 560  # -0.5 + 2.5 t/1000 ≥ 0.9 from t = 560
    # and a fall from 0.6 to -0.5 is softening
    assert detect_phases(STEPS, lam[::-1], THETA).phase == "softening"


def test_single_spike_at_the_first_probe_sets_neither_onset_nor_catapult():
    lam = saturating_ramp(STEPS, wiggle=0.0)
    lam[0] = 2.5 * THETA  # one bad eigen-solve at t = 0
    loss_steps = np.arange(0, 1001)
    p = detect_phases(STEPS, lam, THETA, loss_steps, np.exp(-loss_steps / 400.0), D10)
    assert p.onset_step == 320 and p.phase == "eos"  # the shrinking window used to put the onset at t = 0
    assert p.r0 == pytest.approx(2.5)  # r₀ is the measurement as it is
    assert not p.catapult  # the loss never rose: no unstable start
    assert p.sharpening_slope == pytest.approx(0.5, rel=1e-6)  # Theil–Sen: the spike does not move the slope


def gd_lm_trajectory(steps, r_start=8.0, level=1.17):
    """Full-batch GD on the LM (issue 11): λ starts r_start × above 2/η, falls to the edge within ~20 steps, then
    hovers at `level` × 2/η with ±7% wiggle; the loss jumps up on the first steps, then decreases non-monotonically."""
    r = level + 0.07 * np.sin(1.3 * steps) + (r_start - level) * np.exp(-steps / 5.0)
    loss_steps = np.arange(0, steps[-1] + 1)
    loss = np.exp(-loss_steps / 200.0) + 0.5 * np.exp(-((loss_steps - 3) ** 2) / 4.0) + 0.01 * (-1.0) ** loss_steps
    return r * THETA, loss_steps, loss


def test_full_batch_gd_catapult_then_hover_is_eos():
    steps = np.arange(0, 501, 10)
    lam, ls, loss = gd_lm_trajectory(steps)
    p = detect_phases(steps, lam, THETA, ls, loss)
    assert p.phase == "eos"  # was "above-edge": the catapult and the +17% hover counted as "above"
    assert p.catapult and p.r0 == pytest.approx(8.0, rel=1e-3)
    # r(10, 20, 30, 40) = 2.12, 1.35, 1.26, 1.09: the median of 3 comes under 1.30 at t = 30
    assert p.onset_step == 0 and p.settle_step == 30 and p.time_to_edge == 30
    assert p.overshoot == pytest.approx(0.17, abs=0.03)
    assert p.band_fraction < 0.5  # the symmetric ±15% band alone would miss it ...
    assert p.hover_fraction == 1.0  # ... the hover band [0.85, 1.30] holds every post-settle probe
    assert math.isnan(p.sharpening_slope)  # no progressive sharpening: it started above the edge


def test_catapult_that_collapses_far_below_the_edge():
    steps = np.arange(0, 501, 10)
    r = 0.3 + 2.7 * np.exp(-steps / 10.0)  # r₀ = 3 → 0.3
    ls = np.arange(0, 501)
    loss = np.exp(-ls / 200.0) + 0.3 * (ls == 2)  # one early loss spike
    p = detect_phases(steps, r * THETA, THETA, ls, loss)
    assert p.catapult and p.phase == "below-edge"
    assert p.overshoot == pytest.approx(-0.7, abs=0.01)


def test_momentum_threshold_places_the_edge():
    # SGD momentum β = 0.9, η = 0.1: the edge is (2+2β)/η = 38, λ hovers 5% above it
    eta, beta = 0.1, 0.9
    lam = (2 + 2 * beta) / eta * (1.05 + 0.03 * np.sin(STEPS / 7.0))
    assert detect_phases(STEPS, lam, (2 + 2 * beta) / eta).phase == "eos"
    wrong = detect_phases(STEPS, lam, 2 / eta)  # the blog draft's 2/η puts the edge 1.9× too low
    assert wrong.phase == "above-edge" and wrong.overshoot == pytest.approx(0.995, abs=0.03)


def test_run_that_ends_at_the_edge_is_inconclusive():
    steps = np.arange(0, 81, 10)  # 9 probes: a demo-length run
    lam = 20.0 + 2.3 * steps  # r = 0.1 … 1.02: the edge is reached at t = 70
    p = detect_phases(steps, lam, THETA)
    assert p.onset_step == 70 and p.phase == "inconclusive"  # 2 probes after the edge: holding is untested
    assert p.sharpening_slope == pytest.approx(2.3)


def test_swinging_across_the_edge_is_not_eos():
    r = np.where(np.arange(len(STEPS)) % 2 == 0, 0.3, 2.0)  # median ~1, but never in the band
    p = detect_phases(STEPS, r * THETA, THETA)
    assert p.phase == "inconclusive" and p.hover_fraction == 0.0


def test_never_reaching_the_edge_has_no_time_to_edge():
    p = detect_phases(STEPS, 20.0 + 0.1 * STEPS, THETA)
    assert p.phase == "sharpening" and p.settle_step is None and math.isnan(p.time_to_edge)
    assert p.r0 == pytest.approx(0.1) and not p.catapult

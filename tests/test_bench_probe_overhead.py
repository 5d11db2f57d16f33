"""experiments/bench/probe_overhead.py's summary on known numbers (the runs themselves take minutes: not here)."""
import pytest

from experiments.bench.probe_overhead import probe_counts, summarize


def test_probe_counts_from_metrics_rows():
    rows = [{"train/loss": 1.0},
            {"probe/seconds": 2.0, "probe/hvps": 10.0, "probe/lambda_max": 3.0, "probe/critical_sharpness": 1.0,
             "probe/batch_sharpness": 2.0},
            {"probe/seconds": 1.0, "probe/critical_sharpness": 1.0, "probe/critical_sharpness_seconds": 0.75},
            {"probe/seconds": 1.0, "probe/rayleigh": 0.5, "probe/hvps": 2.0, "probe/rayleigh_seconds": 0.5,
             "probe/critical_sharpness_seconds": 0.25}]
    c = probe_counts(rows)
    assert (c["calls"], c["seconds"], c["hvps"]) == (3, 4.0, 12.0)
    assert (c["λ_max"], c["batch sharpness"], c["critical"], c["rayleigh"]) == (1, 1, 2, 1)
    assert c["kind_seconds"] == {"critical_sharpness": 1.0, "rayleigh": 0.5}


def test_summarize_pairs_off_on_within_abba_blocks():
    on = {"seconds": 10.0, "calls": 5}
    runs = [("off", 90.0, {}), ("on", 100.0, on), ("on", 120.0, on), ("off", 96.0, {}),
            ("off", 80.0, {}), ("on", 100.0, {"seconds": 30.0, "calls": 5}), ("on", 100.0, on), ("off", 100.0, {})]
    sm = summarize(runs, steps=100)
    # pairs: (100-90)/100, (120-96)/120, (100-80)/100, (100-100)/100
    assert sm["overhead"].n == 4 and sm["overhead"].median == pytest.approx(0.15)
    assert (sm["overhead"].lo, sm["overhead"].hi) == pytest.approx((0.0, 0.2))
    # shares: 0.1, 10/120, 0.3, 0.1
    assert sm["probe_share"].median == pytest.approx(0.1) and sm["probe_share"].hi == pytest.approx(0.3)
    # per call 2 s (median of 2, 2, 6, 2), per step median(90, 96, 80, 100)/100 = 0.93 s: ceil(9 * 2 / 0.93) = 20
    assert sm["every10"] == 20
    with pytest.raises(ValueError):
        summarize([("on", 1.0, on), ("on", 1.0, on)], steps=1)

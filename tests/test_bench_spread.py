"""experiments/bench/spread.py: the summaries the benchmarks print, on known numbers."""
import math

import pytest

from experiments.bench.spread import abba, paired_ratios, spread


def test_spread_median_min_max():
    s = spread([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.lo, s.hi, s.n) == (2.5, 1.0, 10.0, 4)
    assert s.fmt(".1f", "x") == "2.5x [1.0–10.0] (n=4)"
    assert spread([0.5]).fmt(".2f") == "0.50"
    assert math.isnan(spread([]).median) and spread([]).fmt() == "n/a"


def test_paired_ratios_pair_by_repeat():
    # repeat 2 is slow on both sides: paired, the ratio stays 2; unpaired medians would not show that
    s = paired_ratios([2.0, 20.0, 4.0], [1.0, 10.0, 2.0])
    assert (s.median, s.lo, s.hi) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])


def test_abba_order():
    assert abba(["off", "on"], 4) == ["off", "on", "on", "off", "off", "on", "on", "off"]
    order = abba(["a", "b", "c"], 2)
    assert order == ["a", "b", "c", "c", "b", "a"] and all(order.count(x) == 2 for x in "abc")

"""experiments/bench/scale.py at toy size: one shortened default SFT run of the tiny model in a spawned process (as
the bench runs each model), summarised into per-kind costs, the share at the default cadence and each probe call's
memory against the training step's, both above their entries and as absolute process peaks."""
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest

from experiments.bench.scale import CADENCE, probed_run, report, summarise


def test_a_short_run_is_summarised_per_kind_and_per_call(tiny_model_dir, tmp_path, capsys):
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as ex:
        n, rows = ex.submit(probed_run, str(tiny_model_dir), 2, str(tmp_path / "run"), "cache", 0, True, 0).result()
    s = summarise(rows, gap=2)
    assert n > 0 and s["step_s"] > 0 and set(s["kinds"]) == set(CADENCE)
    assert [step for step, _, _ in s["calls"]] == [0, 1, 2, 3]   # cold, cheap traces, the warm family, traces
    assert s["kinds"]["lambda_max"]["cold"] > 0 and s["kinds"]["lambda_max"]["warm"] > 0
    assert 0 < s["share"] < 1 and s["cold_hvps"] >= 1
    if sys.platform.startswith("linux"):   # resident-set peaks: absolute ones at least the increments above entry
        assert s["step_peak_mb"] >= s["step_mb"] >= 0
        assert all(peak >= mb >= 0 for _, mb, peak in s["calls"])
    else:
        assert math.isnan(s["step_peak_mb"])
    report("tiny", n, s)
    out = capsys.readouterr().out
    assert "probe share of wall time at the default cadence" in out and "the step's" in out


def test_bad_arguments_are_refused_before_any_model_is_built():
    # the cheap traces run at gap/2 and the family again at gap: an odd gap has no such middle step
    from experiments.bench.scale import main
    with pytest.raises(ValueError, match="even"):
        main(models=("4x256",), gap=3)
    with pytest.raises(ValueError, match="unknown models"):
        main(models=("8x1024",))

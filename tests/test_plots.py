"""Figures: optimizer settings never share a panel, legend labels are unique and say what differs, outliers are
clipped to the axis edge instead of flattening it. Synthetic run dirs (tests/test_report.py's writer)."""

import json

import numpy as np
import pytest

from experiments.plots import build_figure, robust_limits, run_labels, run_styles
from experiments.rundirs import find_runs, load_run
from tests.test_report import write_run


@pytest.fixture
def mixed(tmp_path):
    root = tmp_path / "runs" / "sft_lr"
    write_run(root, "m0-lr1e-02", 1e-2, edge_at=0)
    write_run(root, "m0-lr1e-03", 1e-3)
    write_run(root, "m9-lr1e-02", 1e-2, momentum=0.9, edge_at=0)  # same η, momentum 0.9: another threshold
    return find_runs([root])


def test_labels_name_what_differs(mixed, tmp_path):
    assert run_labels(mixed) == ["η=0.01 · sgd", "η=0.001 · sgd", "η=0.01 · sgd β=0.9"]
    assert run_labels(mixed[:2]) == ["η=0.01", "η=0.001"]  # only η differs: nothing else is shown
    # two seeds of the same setting: the seed joins the label
    a = write_run(tmp_path / "s", "a", 1e-2)
    b = write_run(tmp_path / "s", "b", 1e-2)
    cfg = json.loads((b / "config.json").read_text())
    cfg["config"]["train"]["seed"] = 1
    (b / "config.json").write_text(json.dumps(cfg))
    ra, rb = load_run(a), load_run(b)
    assert run_labels([ra, rb]) == ["η=0.01 · seed=0", "η=0.01 · seed=1"]
    assert [ls for _, ls in run_styles([ra, rb])] == ["-", "--"]  # same colour (η), told apart by line style
    assert run_labels([ra, ra]) == ["η=0.01 (a)", "η=0.01 (a)"]  # identical configs fall back to the run name


def test_momentum_settings_get_their_own_panels(mixed):
    fig = build_figure(mixed, "sft_lr · sft · sgd")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["η=0.001 · sgd", "η=0.01 · sgd", "η=0.01 · sgd β=0.9"] and len(set(legend)) == 3
    lam_axes = [ax for ax in fig.axes if "λ_max (dashed" in ax.get_title()]
    assert [ax.get_title().split("]")[0] for ax in lam_axes] == ["[sgd", "[sgd β=0.9"]
    # each panel holds only its own setting's thresholds: 2/η = 200, 2000 for β=0; (2+2β)/η = 380 for β=0.9
    thresholds = [sorted({round(float(line.get_ydata()[0])) for line in ax.get_lines()
                       if line.get_linestyle() == "--" and line.get_marker() in ("None", "", None)})
                  for ax in lam_axes]
    assert thresholds == [[200, 2000], [380]]


def test_outliers_are_clipped_not_flattening(tmp_path):
    d = write_run(tmp_path / "o", "spiky", 1e-2, edge_at=0)
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()[:-1]]
    rows[50]["probe/batch_sharpness"] = 7.5e4  # the readings
    rows[100]["probe/batch_sharpness"] = -5.4e5
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = build_figure([load_run(d)], "o")
    ax = next(a for a in fig.axes if a.get_title().startswith("batch sharpness"))
    lo, hi = ax.get_ylim()
    assert 200 <= hi < 300 and lo > 0  # the threshold 200 and the ramp (16..204) set the limits
    assert ax.get_yscale() == "log"  # once clipped, the rest is positive
    assert "2 points off-scale" in ax.get_title()
    edge_marks = [line for line in ax.get_lines() if line.get_marker() in ("^", "v")]
    assert sorted(line.get_marker() for line in edge_marks) == ["^", "v"]


def test_robust_limits():
    y = np.r_[np.linspace(10, 20, 30), 1e5]
    assert robust_limits(y) == (10.0, 20.0)
    assert robust_limits(y, keep=[40.0]) == (10.0, 40.0)  # thresholds always stay on the axis
    assert robust_limits(np.linspace(-1, 1, 30)) == (-1.0, 1.0)  # no outliers: the full range
    z = np.r_[np.linspace(-5, 5, 30), -5.4e5]
    assert robust_limits(z) == (-5.0, 5.0)


def test_runs_without_a_known_lr_share_one_style_key(tmp_path):
    # NaN ≠ NaN: a colour map keyed by a NaN η could not be looked up (a KeyError drew no figure)
    from experiments.rundirs import Run

    runs = [Run(tmp_path / f"r{i}", {"regime": "x"}, {}, {}, []) for i in range(2)]
    assert all(np.isnan(r.lr) for r in runs)
    (c0, s0), (c1, s1) = run_styles(runs)
    assert c0 == c1 and s0 != s1

"""Andreyev & Beneventano 2024 at small scale: minibatch SGD (b = 4) on a tanh MLP (MSE, sklearn digits): batch
sharpness rises to 2/η and hovers while the full-batch λ_max stays well below 2/η."""

import json

import numpy as np
import pytest

from experiments.eoss import EossCommand, EossConfig, config_errors, run_eoss
from experiments.report import ReportConfig, run_phases, write_report
from experiments.rundirs import load_run

LR = 0.45


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return load_run(run_eoss(EossConfig(lr=LR, out_dir=str(tmp_path_factory.mktemp("eoss")))))


def test_batch_sharpness_rises_to_two_over_eta_and_hovers(run):
    steps, bs = run.series("probe/batch_sharpness")
    _, two_over_eta = run.series("probe/two_over_eta")
    np.testing.assert_allclose(two_over_eta, 2 / LR)
    r = bs * LR / 2  # 1 at the edge of stochastic stability
    assert len(r) == 11
    # at initialisation it is near the edge already; the first steps drop it well below, then it rises back
    assert r[steps <= 1000].min() < 0.8
    late = r[steps >= 2000]
    assert 0.85 < np.median(late) < 1.1, late  # hovers at 2/η ...
    assert np.all((late > 0.75) & (late < 1.25)), late  # ... without growing on
    _, mor = run.series("probe/batch_sharpness_mor")  # the mean of ratios tells the same story
    assert 0.8 < np.median(mor[steps >= 2000] * LR / 2) < 1.1
    assert run_phases(run, "probe/batch_sharpness").phase == "eos"


def test_full_batch_lambda_max_stays_below_the_edge(run):
    steps, lam = run.series("probe/lambda_max")
    r = lam * LR / 2
    assert np.all(r < 0.65), r  # GD's edge is never reached ...
    _, lo = run.series("probe/batch_sharpness_ci_lo")
    late = steps >= 2000
    assert np.all(lo[late] > lam[late]), (lo[late], lam[late])  # ... while batch sharpness is above it, CI and all
    assert run_phases(run, "probe/lambda_max").phase not in ("eos", "above-edge", "inconclusive")
    _, loss = run.series("train/loss")
    assert loss[-1] < 0.2 * loss[0]  # and SGD keeps training


def test_small_learning_rate_stays_far_below_the_edge(tmp_path):
    run = load_run(run_eoss(EossConfig(lr=0.05, steps=600, probe_every=300, out_dir=str(tmp_path))))
    _, bs = run.series("probe/batch_sharpness")
    assert len(bs) == 3 and np.all(bs * 0.05 / 2 < 0.3)  # the plateau is set by η, not by the network


def test_run_dir_is_idempotent_and_reportable(run, tmp_path):
    before = (run.path / "metrics.jsonl").stat().st_mtime_ns
    assert run_eoss(EossConfig(lr=LR, out_dir=str(run.path.parent))) == run.path
    assert (run.path / "metrics.jsonl").stat().st_mtime_ns == before  # DONE: not rerun
    assert json.loads((run.path / "DONE").read_text())["status"] == "completed"
    index = write_report([run.path], ReportConfig(out=tmp_path / "report"))
    assert "sgd-b4-digits-lr0.45-s0" in index.read_text()


def test_config_errors():
    assert config_errors(EossConfig()) == []
    errs = config_errors(EossConfig(lr=0.0, batch=0, dataset="cifar", bs_max_samples=1))
    assert len(errs) == 4 and any("dataset" in e for e in errs) and any("bs_max_samples" in e for e in errs)
    with pytest.raises(ValueError, match="lr=-1"):
        run_eoss(EossConfig(lr=-1.0))
    assert [c.lr for c in EossCommand(lrs=(0.3, 0.45)).configs()] == [0.3, 0.45]


def test_cli_command(capsys):
    from experiments.cli import main, parse

    assert parse(["eoss", "--lrs", "0.3", "--batch", "8"]) == EossCommand(lrs=(0.3,), batch=8)
    assert main(["eoss", "--lrs", "-0.1"]) == 2
    assert "lr=-0.1" in capsys.readouterr().err

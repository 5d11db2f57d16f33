"""Cohen et al. 2021 at small scale: full-batch GD on a tanh MLP (MSE, sklearn digits) sharpens to 2/η and hovers."""

import json

import numpy as np
import pytest

from agents.eos_lr import ControlConfig
from experiments.cohen2021 import CohenConfig, config_errors, run_cohen
from experiments.report import ReportConfig, run_phases, write_report
from experiments.rundirs import load_run

# (η, steps): both start below the edge (η·λ_0/2 ≈ 0.55 and 0.73) and cross it well within their step budget
SETTINGS = [(0.45, 300), (0.6, 240)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohen")
    return {lr: load_run(run_cohen(CohenConfig(lr=lr, steps=steps, eig_every=20, out_dir=str(root))))
            for lr, steps in SETTINGS}


@pytest.mark.parametrize("lr", [lr for lr, _ in SETTINGS])
def test_sharpness_rises_to_two_over_eta_and_hovers(runs, lr):
    run = runs[lr]
    steps, lam = run.series("probe/lambda_max")
    _, two_over_eta = run.series("probe/two_over_eta")
    np.testing.assert_allclose(two_over_eta, 2 / lr)
    r = lam * lr / 2  # η·λ/2: 1 at the edge
    assert r[0] < 0.85  # starts below the edge
    assert r.max() >= 0.9  # progressive sharpening reaches 2/η (within 10%)
    late = r[steps >= 0.6 * steps[-1]]
    assert np.all((late > 0.85) & (late < 1.3)), late  # and then stays at the edge instead of growing on
    assert 0.95 < np.median(late) < 1.2
    p = run_phases(run, "probe/lambda_max")
    assert p.phase == "eos"
    assert p.loss_up_fraction > 0.1  # at the edge the loss goes up on some steps ...
    assert p.loss_drop > 0  # ... but keeps decreasing over the long run


def test_loss_is_monotone_before_the_edge(runs):
    run = runs[0.45]
    p = run_phases(run, "probe/lambda_max")
    assert p.sharpening_slope > 0 and 40 <= p.onset_step <= 120
    s, loss = run.series("train/loss")
    assert np.all(np.diff(loss[s <= p.onset_step - 20]) < 0)  # classical descent regime


def test_small_learning_rate_stays_far_below_the_edge(tmp_path):
    run = load_run(run_cohen(CohenConfig(lr=0.05, steps=100, eig_every=50, out_dir=str(tmp_path))))
    _, lam = run.series("probe/lambda_max")
    assert np.all(lam * 0.05 / 2 < 0.3)
    assert run_phases(run, "probe/lambda_max").phase in ("flat", "sharpening")
    _, loss = run.series("train/loss")
    assert np.all(np.diff(loss) < 0)


def test_run_dir_is_idempotent_and_reportable(runs, tmp_path):
    run = runs[0.6]
    before = (run.path / "metrics.jsonl").stat().st_mtime_ns
    assert run_cohen(CohenConfig(lr=0.6, steps=240, eig_every=20, out_dir=str(run.path.parent))) == run.path
    assert (run.path / "metrics.jsonl").stat().st_mtime_ns == before  # DONE: not rerun
    assert json.loads((run.path / "DONE").read_text())["status"] == "completed"
    index = write_report([run.path.parent], ReportConfig(out=tmp_path / "report"))
    assert "gd-digits-lr0.6-s0" in index.read_text() and len(list((tmp_path / "report").glob("*.png"))) == 1


def test_config_errors():
    assert config_errors(CohenConfig()) == []
    errs = config_errors(CohenConfig(lr=-1.0, dataset="cifar", steps=0))
    assert len(errs) == 3 and any("dataset" in e for e in errs)
    with pytest.raises(ValueError, match="lr=-1"):
        run_cohen(CohenConfig(lr=-1.0))


def test_synthetic_dataset_runs(tmp_path):
    run = load_run(run_cohen(CohenConfig(lr=0.1, steps=20, eig_every=10, dataset="synthetic", n_train=200,
                                         out_dir=str(tmp_path))))
    _, loss = run.series("train/loss")
    assert len(loss) == 21 and loss[-1] < loss[0]
    assert run.has("probe/lambda_max")


def test_minibatch_sgd_logs_the_full_batch_loss_and_steps_on_fresh_batches(tmp_path):
    gd = load_run(run_cohen(CohenConfig(lr=0.1, steps=40, eig_every=20, out_dir=str(tmp_path))))
    sgd = load_run(run_cohen(CohenConfig(lr=0.1, steps=40, eig_every=20, batch=25, out_dir=str(tmp_path))))
    assert sgd.name == "sgd-b25-digits-lr0.1-s0" and not sgd.full_batch
    (_, lg), (_, ls), (_, lb) = gd.series("train/loss"), sgd.series("train/loss"), sgd.series("train/batch_loss")
    assert ls[0] == lg[0]                      # the same θ₀: train/loss is the full-batch loss in both modes
    assert ls[1] != lg[1] and ls[-1] < ls[0]   # SGD takes other steps, and learns
    assert len(set(lb[:10].round(12))) == 10   # a fresh minibatch every step
    assert sgd.has("probe/lambda_max")         # the full-batch λ_max, as for GD
    # the controller runs on the minibatches (their Hessian and loss) and holds η finite
    ctl = load_run(run_cohen(CohenConfig(lr=0.1, steps=40, eig_every=20, batch=25, schedule="eos",
                                         control=ControlConfig(target=0.8, every=5), out_dir=str(tmp_path))))
    _, lr = ctl.series("train/lr")
    assert ctl.status["status"] == "completed" and np.isfinite(lr).all() and lr[-1] != lr[0]
    assert config_errors(CohenConfig(batch=300, n_train=250)) == ["batch=300 must be in [0, n_train=250] (0 = full "
                                                                  "batch)"]

"""probes.thresholds against ground truth: the 1-D quadratic under each optimizer's exact recurrence is stable just
below the threshold and diverges just above it; the run-dir reader derives the same thresholds as the probes; and
the module (with the reader) imports without torch."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.rundirs import load_run
from probes.thresholds import adam_threshold, gd_threshold, momentum_threshold, stability_thresholds, thresholds


def _diverges(lam, lr, momentum=0.0, dampening=0.0, nesterov=False, steps=2000):
    """torch.optim.SGD's recurrence on f(x) = ½λx², in plain floats: b₁ = g₁ (no dampening on the first step),
    then b ← βb + (1 − τ)g; x ← x − η(g + βb) (Nesterov) or x − ηb."""
    x, buf = 1.0, None
    for _ in range(steps):
        g = lam * x
        if momentum:
            buf = g if buf is None else momentum * buf + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        x -= lr * g
        if not math.isfinite(x) or abs(x) > 1e6:
            return True
    return abs(x) > 1.0


@pytest.mark.parametrize("momentum, dampening, nesterov", [
    (0.0, 0.0, False), (0.9, 0.0, False), (0.5, 0.3, False), (0.99, 0.0, False),
    (0.9, 0.0, True), (0.5, 0.3, True), (0.7, 1.0, True),   # Nesterov with dampening: torch refuses it, the math not
])
def test_momentum_threshold_separates_stable_from_divergent(momentum, dampening, nesterov):
    lr = 0.05
    crit = momentum_threshold(lr, momentum, dampening, nesterov)
    assert not _diverges(0.98 * crit, lr, momentum, dampening, nesterov)
    assert _diverges(1.02 * crit, lr, momentum, dampening, nesterov)


def test_closed_forms():
    assert gd_threshold(0.1) == pytest.approx(20.0)
    assert momentum_threshold(0.1, 0.9) == pytest.approx(38.0)                     # (2 + 2β)/η
    assert momentum_threshold(0.1, 0.9, nesterov=True) == pytest.approx(38.0 / 2.8)  # / (1 + 2β)
    assert momentum_threshold(0.1, 0.5, dampening=0.5) == pytest.approx(60.0)      # / (1 − τ)
    assert momentum_threshold(0.1, 0.5, dampening=1.0) == math.inf                 # the buffer forgets g
    assert momentum_threshold(0.1, 0.0, dampening=0.5, nesterov=True) == gd_threshold(0.1)
    # Adam with a frozen preconditioner is heavy ball with β = τ = β₁ on P⁻¹H
    assert adam_threshold(0.1, 0.9) == pytest.approx(momentum_threshold(0.1, 0.9, dampening=0.9))
    assert not _diverges(0.98 * adam_threshold(0.1, 0.8), 0.1, 0.8, 0.8)
    assert _diverges(1.02 * adam_threshold(0.1, 0.8), 0.1, 0.8, 0.8)
    with pytest.raises(ValueError, match="lr must be positive"):
        thresholds(0.0)


def test_stability_thresholds_read_torch_param_groups():
    p = [torch.zeros(1, requires_grad=True)]
    assert stability_thresholds(None, 0.1) == {"two_over_eta": 20.0}
    assert stability_thresholds(torch.optim.SGD(p, lr=0.1), 0.1) == {"two_over_eta": 20.0}
    nest = stability_thresholds(torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 0.1)
    assert nest["momentum_threshold"] == momentum_threshold(0.1, 0.9, nesterov=True)
    damp = stability_thresholds(torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.5), 0.1)
    assert damp["momentum_threshold"] == momentum_threshold(0.1, 0.5, dampening=0.5)
    adam = stability_thresholds(torch.optim.AdamW(p, lr=0.1, betas=(0.8, 0.99)), 0.1)
    assert adam == {"two_over_eta": 20.0, "adam_threshold": adam_threshold(0.1, 0.8)}


@pytest.mark.parametrize("optim", [dict(name="sgd", momentum=0.0), dict(name="sgd", momentum=0.9),
                                   dict(name="sgd", momentum=0.9, nesterov=True),
                                   dict(name="sgd", momentum=0.5, dampening=0.5),
                                   dict(name="adam", betas=[0.8, 0.999])])
def test_run_dir_reader_derives_the_probes_thresholds(tmp_path, optim):
    lr = 0.02
    (tmp_path / "config.json").write_text(json.dumps({"config": {"optim": {"lr": lr, **optim}}}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "probe/lambda_max": 1.0,
                                                        "probe/adam_lambda_max": 1.0}) + "\n")
    run = load_run(tmp_path)
    p = [torch.zeros(1, requires_grad=True)]
    if optim["name"] == "adam":
        opt = torch.optim.Adam(p, lr=lr, betas=tuple(optim["betas"]))
    else:
        opt = torch.optim.SGD(p, lr=lr, **{k: v for k, v in optim.items() if k != "name"})
    logged = stability_thresholds(opt, lr)
    key = "probe/adam_lambda_max" if optim["name"] == "adam" else "probe/lambda_max"
    name = {"probe/adam_lambda_max": "adam_threshold"}.get(key, "momentum_threshold")
    expected = logged.get(name, logged["two_over_eta"])
    assert run.threshold(key)[1][0] == pytest.approx(expected, rel=1e-12)


def test_thresholds_and_run_dir_reader_import_without_torch():
    code = "import sys, probes.thresholds, experiments.rundirs; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    assert subprocess.run([sys.executable, "-c", code], cwd=root, env=env).returncode == 0

"""Report from run directories: synthetic run dirs in the CONTRACTS.md layout with known EoS behaviour."""

import json
import math

import numpy as np
import pytest

from experiments.phases import PhaseConfig
from experiments.report import ReportConfig, forgetting_rows, phase_rows, write_report
from experiments.rundirs import find_runs, load_run


def write_run(root, name, lr, *, momentum=0.0, optim="sgd", regime="sft", rank=0, steps=400, slope=0.5, edge_at=None,
              samples=None, status="completed", log_threshold=True):
    """A run dir whose λ_max ramps at `slope` per step from 10% of θ and, if `edge_at` is set, saturates at θ."""
    d = root / name
    d.mkdir(parents=True)
    theta = 38.0 / lr if optim == "adam" else (2 + 2 * momentum) / lr  # Adam: (2+2β₁)/((1-β₁)η), β₁ = 0.9
    cfg = {"regime": regime, "model": {"name": "embedded", "lora_rank": rank},
           "optim": {"name": optim, "lr": lr, "momentum": momentum, "weight_decay": 1e-4, "betas": [0.9, 0.999]},
           "train": {"steps": steps, "micro_batch": 4, "grad_accum": 4, "seed": 0}, "env": {"env_id": "ArithRLVR-v0"}}
    (d / "config.json").write_text(json.dumps({"config": cfg, "git_hash": "abc123", "argv": ["eoslab"]}))
    with open(d / "metrics.jsonl", "w") as f:
        for t in range(steps + 1):
            wiggle = 0.01 * (-1) ** t if edge_at is not None and t > edge_at else 0.0
            rec = {"step": t, "train/loss": math.exp(-t / 300) + wiggle, "train/lr": lr}
            if t % 10 == 0:
                lam = 0.1 * theta + slope * t
                if edge_at is not None:
                    lam = min(lam, theta * (1 + 0.02 * math.sin(t)))
                rec["probe/lambda_max"] = lam
                if optim == "adam":  # the preconditioned λ carries the edge; the raw λ_max is 3× it
                    rec["probe/adam_lambda_max"], rec["probe/lambda_max"] = lam, 3 * lam
                    rec["probe/adam_threshold"] = theta
                rec["probe/batch_sharpness"] = 0.8 * lam
                if log_threshold:
                    rec["probe/two_over_eta"] = 2 / lr
                    if momentum:
                        rec["probe/momentum_threshold"] = theta
            if t % 100 == 0:
                rec["retention/perplexity"] = 20.0 + t / 100
                rec["eval/accuracy"] = t / 1000
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 401, "train/lo')  # a run killed mid-write
    (d / "status.json").write_text(json.dumps({"status": status, "step": steps, "reason": ""}))
    (d / "DONE").write_text(json.dumps({"status": status, "step": steps, "reason": ""}))
    if samples:
        (d / "samples.json").write_text(json.dumps(samples))
    return d


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "runs" / "sft_lr"
    write_run(root, "sft-lr1e-02", 1e-2, edge_at=0)  # θ=200: λ = 20 + 0.5 t reaches 180 at t=320, then hovers
    write_run(root, "sft-lr1e-03", 1e-3)  # θ=2000: λ = 200 + 0.5 t ≤ 400, far below the edge
    write_run(root, "sft-mom-lr1e-02", 1e-2, momentum=0.9, edge_at=0, log_threshold=False,  # θ = 380
              samples={"base_step": 0, "final_step": 400,
                       "rows": [{"prompt": "2+2=", "base": "22", "final": "Answer: 4", "final_correct": True}]})
    return tmp_path / "runs"


def test_loads_runs_and_derives_thresholds(sweep_dir):
    runs = find_runs([sweep_dir])
    assert [r.name for r in runs] == ["sft-lr1e-02", "sft-lr1e-03", "sft-mom-lr1e-02"]
    r = load_run(sweep_dir / "sft_lr" / "sft-mom-lr1e-02")
    assert len(r.records) == 401  # the partial last line is skipped
    steps, theta = r.threshold("probe/lambda_max")  # not logged: (2+2β)/η from config.json
    assert len(steps) == 41 and theta == pytest.approx(np.full(41, 380.0))
    assert r.edge() == pytest.approx(3.8)


def test_phase_table_matches_construction(sweep_dir):
    rows = {row["run"]: row for row in phase_rows(find_runs([sweep_dir]), PhaseConfig(delta=0.1))}
    eos = rows["sft-lr1e-02"]
    assert eos["phase"] == "eos"
    assert eos["onset_step"] == 320  # 20 + 0.5 t ≥ 0.9·200
    assert eos["ps_slope"] == pytest.approx(0.5)
    assert eos["band_fraction"] == 1.0
    assert eos["loss_up_fraction"] > 0.4
    assert eos["bs_phase"] == "sharpening"  # batch sharpness = 0.8 λ never reaches 0.9 θ
    low = rows["sft-lr1e-03"]
    assert low["phase"] == "sharpening" and low["onset_step"] is None
    assert low["ps_slope"] == pytest.approx(0.5)
    mom = rows["sft-mom-lr1e-02"]  # θ = 380: 38 + 0.5 t ≥ 342 → t = 608 > 400 steps, though η·λ > 2 from t=324
    assert mom["phase"] == "sharpening" and mom["optim"] == "sgd β=0.9"
    assert mom["max_ratio"] == pytest.approx(238 / 380)


def test_forgetting_numbers(sweep_dir):
    rows = forgetting_rows(find_runs([sweep_dir]))
    assert len(rows) == 3
    assert rows[0]["perplexity@0"] == 20.0 and rows[0]["perplexity@end"] == 24.0
    assert rows[0]["ppl ratio"] == pytest.approx(1.2)
    assert rows[0]["accuracy@end"] == pytest.approx(0.4)


def test_html_report(sweep_dir, tmp_path):
    out = tmp_path / "report"
    index = write_report([sweep_dir], ReportConfig(out=out))
    text = index.read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 1  # one sweep group: sft_lr · sft · sgd
    assert pngs[0] in text and (out / pngs[0]).stat().st_size > 20_000
    assert "Answer: 4" in text and "sft-mom-lr1e-02" in text
    assert json.loads((out / "phases.json").read_text())[0]["phase"] == "eos"


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directories"):
        write_report([tmp_path], ReportConfig(out=tmp_path / "r"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_runs([tmp_path / "missing"])


def test_adam_runs_use_the_preconditioned_sharpness(tmp_path):
    d = write_run(tmp_path / "adam_lr", "adam-lr1e-03", 1e-3, optim="adam", edge_at=0, slope=100.0)
    run = load_run(d)
    assert run.primary_sharpness == "probe/adam_lambda_max"
    assert run.edge("probe/adam_lambda_max") == pytest.approx(38.0)
    row = phase_rows([run], PhaseConfig(delta=0.1))[0]
    assert row["sharpness"] == "adam_lambda_max"
    assert row["phase"] == "eos" and row["onset_step"] == 310  # 3800 + 100 t ≥ 0.9·38000 from t = 304
    assert write_report([d], ReportConfig(out=tmp_path / "r")).exists()

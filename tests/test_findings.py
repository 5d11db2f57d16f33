"""Findings table and rule-generated statements on synthetic run dirs with known phases and seed spread."""

import json
import math

import pytest

from experiments.findings import findings_table, stat, statements
from experiments.rundirs import find_runs
from tests.test_report import write_run


def seeded(root, name, lr, seed, same_as_seed0=False, **kw):
    """A write_run dir with train.seed = seed; its losses differ from other seeds' by seed·1e-9 (real seeds never
    give bitwise-equal runs), unless ``same_as_seed0`` (a seed that changed nothing)."""
    d = write_run(root, name, lr, **kw)
    cfg = json.loads((d / "config.json").read_text())
    cfg["config"]["train"]["seed"] = seed
    (d / "config.json").write_text(json.dumps(cfg))
    if not same_as_seed0:
        lines = (d / "metrics.jsonl").read_text().split("\n")
        rows = [json.loads(x) for x in lines[:-1]]
        for r in rows:
            r["train/loss"] += seed * 1e-9
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + lines[-1])


@pytest.fixture
def study(tmp_path):
    root = tmp_path / "runs"
    for seed, slope in enumerate((0.5, 0.6, 0.7)):
        seeded(root / "sft", f"edge-s{seed}", 1e-2, seed, edge_at=0)  # θ = 200: ramps into the edge, holds it
        seeded(root / "sft", f"low-s{seed}", 1e-3, seed, slope=slope)  # θ = 2000: r ≤ 0.25, never reaches it
        seeded(root / "mom", f"mom-s{seed}", 1e-2, seed, momentum=0.9, slope=slope / 50)  # θ = 380: r ≈ 0.1, flat
    return find_runs([root])


def test_table_numbers(study):
    rows = {(r["optim"], r["lr"]): r for r in findings_table(study)}
    assert len(rows) == 3
    edge = rows[("sgd", 1e-2)]
    assert edge["seeds"] == 3 and edge["phases"] == {"eos": 3} and edge["catapult_share"] == 0.0
    assert edge["r0"].mean == pytest.approx(0.1) and edge["r0"].n == 3
    assert edge["time_to_edge"].mean == 300  # 20 + 0.5 t ≥ 0.85·200 from t = 300 (δ = 0.15)
    low = rows[("sgd", 1e-3)]
    assert low["phases"] == {"sharpening": 3} and math.isnan(low["time_to_edge"].mean)
    # dr/dt·1000 = slope/θ·1000 = 0.25, 0.30, 0.35: mean 0.3, sd 0.05, t(0.975, 2) = 4.303
    assert low["sharpening_rate"].mean == pytest.approx(0.3)
    assert low["sharpening_rate"].hi - 0.3 == pytest.approx(4.303 * 0.05 / math.sqrt(3), rel=1e-3)
    assert low["final_accuracy"].mean == pytest.approx(0.4)
    assert rows[("sgd β=0.9", 1e-2)]["phases"] == {"flat": 3}


def test_statements_follow_their_rules(study):
    out = statements(findings_table(study))
    answers = {s["group"]: s["answer"] for s in out if "answer" in s}
    assert answers == {"sft · sgd": "yes", "sft · sgd β=0.9": "no"}
    by = {(s["group"], s["rule"]): s for s in out}
    holds = by[("sft · sgd", "phase = eos in ≥ 2/3 of the seeds")]
    assert holds["holds"] and holds["lrs"] == [1e-2]
    assert holds["statement"] == "sft · sgd: reaches and holds the edge at η ∈ {0.01}"
    sharp = by[("sft · sgd", "95% CI of the sharpening rate across seeds > 0 (≥ 2 seeds)")]
    # both sharpen into / towards the edge (the η = 0.01 seeds are identical: a zero-width CI at 0.5/200·1000 = 2.5)
    assert sharp["lrs"] == [1e-3, 1e-2]
    below = "every seed flat or softening (no onset, not still sharpening)"
    assert by[("sft · sgd", below)]["lrs"] == []  # η = 0.001 is still sharpening when the runs end
    assert by[("sft · sgd β=0.9", below)]["lrs"] == [1e-2]
    assert not by[("sft · sgd β=0.9", "phase = eos in ≥ 2/3 of the seeds")]["holds"]
    assert all(s["rule"] for s in out)


def test_one_seed_or_a_short_run_is_inconclusive(tmp_path):
    seeded(tmp_path / "r", "short", 1e-2, 0, steps=30, slope=6.0)  # reaches the edge at t = 30, then ends
    out = statements(findings_table(find_runs([tmp_path / "r"])))
    assert [s["answer"] for s in out if "answer" in s] == ["inconclusive"]
    # one seed that holds the edge is an anecdote, not a yes; a second seed makes it one
    seeded(tmp_path / "one", "edge-s0", 1e-2, 0, edge_at=0)
    out = statements(findings_table(find_runs([tmp_path / "one"])))
    assert [(s["answer"], s["statement"]) for s in out if "answer" in s] == \
        [("inconclusive", "sft · sgd: does it reach and hold the edge? inconclusive (1 seed per η; the rule needs 2)")]
    assert next(s for s in out if "eos in" in s["rule"])["holds"]  # the per-η statement still says what it saw
    seeded(tmp_path / "one", "edge-s1", 1e-2, 1, edge_at=0)
    assert [s["answer"] for s in statements(findings_table(find_runs([tmp_path / "one"]))) if "answer" in s] == ["yes"]


def test_runs_without_probes_make_no_cell(study, tmp_path):
    # a learning run (probes off, AdamW) beside the study's runs: its curves belong in the figures, but a cell
    # without a sharpness series would answer "inconclusive" for its group and drag its regime's answer with it
    d = write_run(tmp_path / "learn", "learn", 1e-4, optim="adamw")
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()[:-1]]
    (d / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in rec.items() if not k.startswith("probe/")})
                                             + "\n" for rec in lines))
    runs = study + find_runs([tmp_path / "learn"])
    assert len(runs) == len(study) + 1
    table = findings_table(runs)
    assert {r["optim"] for r in table} == {"sgd", "sgd β=0.9"} and table == findings_table(study)


def test_identical_seeds_count_once(tmp_path):
    # full-batch GD from one model on one set is deterministic: three "seeds" that are one run are one run
    for seed in range(3):
        seeded(tmp_path / "gd", f"edge-s{seed}", 1e-2, seed, same_as_seed0=True, edge_at=0)
    rows = findings_table(find_runs([tmp_path / "gd"]))
    assert [(r["seeds"], r["identical_seeds"]) for r in rows] == [(1, 2)]
    assert [s["answer"] for s in statements(rows) if "answer" in s] == ["inconclusive"]
    seeded(tmp_path / "gd", "edge-s3", 1e-2, 3, edge_at=0)  # a run that differs is a second seed
    rows = findings_table(find_runs([tmp_path / "gd"]))
    assert [(r["seeds"], r["identical_seeds"]) for r in rows] == [(2, 2)]


def test_stat():
    s = stat([1.0, 2.0, 3.0, float("nan"), None])
    assert (s.mean, s.n) == (2.0, 3) and s.hi - 2.0 == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-3)
    one = stat([5.0])
    assert one.mean == 5.0 and math.isnan(one.lo) and one.n == 1
    assert stat([]).n == 0


def test_report_shows_the_findings(study, tmp_path):
    from experiments.report import ReportConfig, write_report

    index = write_report([study[0].path.parent.parent], ReportConfig(out=tmp_path / "report"))
    text = index.read_text()
    assert "sft · sgd: does it reach and hold the edge? yes" in text and "phase = eos in ≥ 2/3 of the seeds" in text
    data = json.loads((tmp_path / "report" / "findings.json").read_text())
    assert len(data["table"]) == 3 and data["table"][0]["r0"]["n"] == 3

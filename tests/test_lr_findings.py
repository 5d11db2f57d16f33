"""experiments.lr_findings on synthetic run dirs with known losses and controller costs: arms by run name, the best
constant, paired ratios by seed, the loss at equal compute, statements by rule, and the report's section."""
import json
import math

import pytest

from experiments.lr_findings import HVP_COST, comparisons, lr_comparison
from experiments.rundirs import find_runs


def write(root, arm, seed, losses, schedule="constant", hvps_per_step=0, status="completed", cfg=None,
          accuracy=None):
    """A Cohen MLP run dir (or, with ``cfg``, a run of that config), with a final eval/accuracy row if given."""
    d = root / f"{arm}-s{seed}"
    d.mkdir(parents=True)
    cfg = cfg or {"regime": "gd-mse", "experiment": "cohen2021", "lr": 0.3, "schedule": schedule, "warmup_steps": 0,
                  "seed": seed}
    (d / "config.json").write_text(json.dumps({"config": cfg}))
    with open(d / "metrics.jsonl", "w") as f:
        for t, loss in enumerate(losses):
            row = {"step": t, "train/loss": loss, "train/seconds": 0.1 * t}
            if hvps_per_step:
                row.update({"optim/est_hvps": hvps_per_step, "optim/est_grads": 0, "optim/est_forwards": 0})
            f.write(json.dumps(row) + "\n")
        if accuracy is not None:
            f.write(json.dumps({"step": len(losses), "eval/accuracy": accuracy}) + "\n")
    (d / "status.json").write_text(json.dumps({"status": status}))
    (d / "DONE").write_text("{}")


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "cohen"
    for seed, scale in enumerate((1.0, 2.0, 1.5)):
        curve = [scale * 11 / (t + 1) for t in range(11)]  # final loss = scale (step 10 of 10 steps)
        write(root, "gd-lr1", seed, curve)
        write(root, "gd-lr0.3", seed, [3 * x for x in curve])
        # the controller halves the loss at every step but spends 1 HVP (1.6 G) per step: within 10 G it has taken
        # steps 0..3 (cost of step t: t·(1 + 1.6) ≤ 10 → t ≤ 3), whose loss is 0.5·scale·11/4
        write(root, "gd-eos0.8-lr0.3", seed, [0.5 * x for x in curve], schedule="eos", hvps_per_step=1)
    write(root, "gd-lr3", 0, [1.0] * 5, status="diverged")
    return find_runs([root])


def test_comparison_numbers(runs):
    found = lr_comparison(runs)
    assert found["best_constant"] == "gd-lr1" and found["budget"] == 10
    eos = found["arms"]["gd-eos0.8-lr0.3"]
    assert eos["loss"] == pytest.approx(0.5 * 1.5) and eos["n"] == 3
    assert eos["x_best"] == pytest.approx([0.5, 0.5, 0.5])  # the same ratio in every seed: a zero-width interval
    assert eos["loss_at_C"] == pytest.approx(0.5 * 1.5 * 11 / 4)
    assert eos["x_best_at_C"] == pytest.approx([1.375] * 3) and eos["est_hvps"] == 11
    assert found["arms"]["gd-lr0.3"]["x_best"] == pytest.approx([3, 3, 3])
    assert math.isinf(found["arms"]["gd-lr3"]["loss"]) and found["arms"]["gd-lr3"]["diverged"] == 1
    said = {(s["arm"], s["at"]): s["verdict"] for s in found["statements"]}
    assert said == {("gd-eos0.8-lr0.3", "at equal steps"): "beats",
                    ("gd-eos0.8-lr0.3", "at equal compute (10 G)"): "loses to"}  # constant arms make no statement
    assert HVP_COST == 1.6


def test_unresolved_when_seeds_disagree(tmp_path):
    root = tmp_path / "x"
    for seed, (base, ctl) in enumerate(((1.0, 0.5), (1.0, 2.0), (1.0, 1.0))):
        write(root, "gd-lr1", seed, [2.0, base])
        write(root, "gd-cdat2-lr0.3", seed, [2.0, ctl], schedule="cdat")
    found = lr_comparison(find_runs([root]))
    assert [s["verdict"] for s in found["statements"]] == ["is not resolved from"] * 2


def test_only_experiments_with_a_controller_and_a_constant_are_compared(runs, tmp_path):
    write(tmp_path / "other", "gd-lr1", 0, [1.0, 0.5])  # another experiment with no controller
    got = comparisons(runs + find_runs([tmp_path / "other"]))
    assert list(got) == ["cohen · gd-mse"]


def test_report_renders_the_comparison(runs, tmp_path):
    from experiments.report import ReportConfig, write_report

    index = write_report([runs[0].path.parent], ReportConfig(out=tmp_path / "rep"))
    md = (index.parent / "findings.md").read_text()
    assert "Learning-rate controllers vs the best constant: cohen · gd-mse" in md
    assert "gd-eos0.8-lr0.3 beats the best constant (gd-lr1) at equal steps: final loss × 0.50 [0.50, 0.50]" in md
    assert "× best" in index.read_text()
    assert json.loads((index.parent / "findings.json").read_text())["lr_comparisons"]["cohen · gd-mse"]


def test_lm_runs_use_the_tail_mean_loss_held_out_accuracy_and_the_gpt_neox_hvp_cost(tmp_path):
    from experiments.lr_findings import HVP_COST_LM

    root = tmp_path / "adaptive_lr"

    def lm(arm, seed, losses, acc, schedule="constant", hvps=0):
        cfg = {"regime": "sft", "model": {"name": "embedded", "lora_rank": 0}, "train": {"full_batch": False},
               "optim": {"name": "adamw", "lr": 1e-3, "schedule": schedule, "warmup_steps": 0}}
        write(root, arm, seed, losses, hvps_per_step=hvps, cfg=cfg, accuracy=acc)

    for seed in range(3):
        # 20 steps: the last 2 (10 %) average to 1.0 for the constant, 0.5 for eos; a noisy last step does not decide
        lm("sft-const-lr0.001", seed, [3.0] * 18 + [1.5, 0.5], acc=0.50 + 0.01 * seed)
        lm("sft-eos0.9-lr0.001", seed, [3.0 - 0.1 * t for t in range(18)] + [0.25, 0.75], acc=0.60 + 0.01 * seed,
           schedule="eos", hvps=1)
    found = lr_comparison(find_runs([root]))
    assert found["best_constant"] == "sft-const-lr0.001"
    eos = found["arms"]["sft-eos0.9-lr0.001"]
    assert eos["loss"] == pytest.approx(0.5) and eos["x_best"] == pytest.approx([0.5] * 3)
    assert eos["accuracy"] == pytest.approx(0.61) and eos["d_acc"] == pytest.approx([0.1] * 3)
    said = {(s["arm"], s["at"]): s["verdict"] for s in found["statements"]}
    assert said[("sft-eos0.9-lr0.001", "held-out accuracy")] == "above"
    # equal compute at 19 G with 1 HVP (2.1 G) per step: steps t with t·3.1 ≤ 19, t ≤ 6: loss 2.4 (the MLP's
    # 1.6 G would allow step 7)
    assert eos["loss_at_C"] == pytest.approx(2.4) and HVP_COST_LM == 2.1


def test_rlvr_runs_are_ranked_by_their_rollouts_error_rate_not_the_ppo_loss(tmp_path):
    root = tmp_path / "adaptive_lr"

    def rl(arm, seed, rewards, ppo_losses, schedule="constant"):
        d = root / f"{arm}-s{seed}"
        d.mkdir(parents=True)
        cfg = {"regime": "rl", "model": {"name": "warm-start", "lora_rank": 0}, "train": {"full_batch": False},
               "optim": {"name": "adamw", "lr": 1e-4, "schedule": schedule, "warmup_steps": 0}}
        (d / "config.json").write_text(json.dumps({"config": cfg}))
        with open(d / "metrics.jsonl", "w") as f:
            for t, (r, loss) in enumerate(zip(rewards, ppo_losses)):
                f.write(json.dumps({"step": t, "env/reward_mean": r, "train/loss": loss}) + "\n")
        (d / "status.json").write_text(json.dumps({"status": "completed"}))

    for seed in range(3):
        # PPO losses near 0 with either sign, lower for the worse arm: they must not decide
        rl("rl-const-lr0.0001", seed, [0.2] * 18 + [0.5, 0.5], [-0.01] * 20)
        rl("rl-const-lr3e-05", seed, [0.2] * 18 + [0.25, 0.25], [-0.05] * 20)
        rl("rl-eos0.9-lr0.0001", seed, [0.2] * 18 + [0.75, 0.75], [0.02] * 20, schedule="eos")
    found = lr_comparison(find_runs([root]))
    assert found["objective"] == "error rate 1 − reward" and found["best_constant"] == "rl-const-lr0.0001"
    eos = found["arms"]["rl-eos0.9-lr0.0001"]
    assert eos["loss"] == pytest.approx(0.25) and eos["x_best"] == pytest.approx([0.5] * 3)
    said = [s["statement"] for s in found["statements"]]
    assert any("beats the best constant (rl-const-lr0.0001) at equal steps: final error rate 1 − reward × 0.50"
               in s for s in said), said

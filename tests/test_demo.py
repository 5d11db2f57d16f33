"""The demo end to end at toy scale on the tiny model: SFT, LoRA and RLVR studies on 2 spawned workers, the Cohen
validation, and the report (the full-size demo is `make demo`)."""

import json

from experiments.demo import DemoConfig, demo_sweeps, run_demo
from experiments.rundirs import find_runs
from experiments.run import default_config
from experiments.sweep import WARM_START, Sweep


def test_full_demo_sizes_match_the_seed_setup():
    sweeps = {s.name: s for s in demo_sweeps(DemoConfig())}
    assert set(sweeps) == {"sft", "lora_r8", "rl"}
    learn, *rl_grid = sweeps["rl"].configs  # the run that shows learning: `eoslab rl` at its defaults, no probes
    assert (learn.optim, learn.ppo) == (default_config("rl").optim, default_config("rl").ppo)
    assert learn.probe.every == 0 and learn.model.name == WARM_START and learn.train.steps == 100
    for s in (sweeps["sft"], sweeps["lora_r8"], Sweep("rl", rl_grid, "")):
        assert len(s.configs) == 3
        for c in s.configs:
            assert (c.optim.name, c.optim.momentum, c.optim.weight_decay) == ("sgd", 0.9, 1e-4)
            assert c.probe.every > 0 and c.model.name == ("embedded" if c.regime == "sft" else WARM_START)
    assert sweeps["rl"].warm_start.model.name == "embedded" and sweeps["rl"].warm_start.regime == "sft"
    assert all(c.train.micro_batch * c.train.grad_accum == 16 for c in sweeps["sft"].configs)
    assert {c.model.lora_rank for c in sweeps["lora_r8"].configs} == {8}


def test_tiny_demo_end_to_end(tiny_model_dir, tmp_path, capsys):
    cfg = DemoConfig(out=tmp_path / "demo", model=str(tiny_model_dir), workers=2, sft_lrs=(1e-2,), sft_steps=3,
                     lora_lrs=(1e-2,), lora_steps=3, rl_lrs=(1e-2,), rl_steps=2, warm_start_steps=2, probe_every=1,
                     batch_sharpness_every=0, cohen_lrs=(0.45,), cohen_steps=40, rl_learn_steps=2, n_eval=2)
    index = run_demo(cfg)
    out = capsys.readouterr().out
    assert f"report: {index.resolve()}" in out and "FAILED" not in out
    all_runs = find_runs([tmp_path / "demo"])
    assert len(all_runs) == 6  # warm start + 3 LM runs + the default RLVR run + 1 Cohen run
    learner = next(r for r in all_runs if r.optimizer == "adamw" and r.regime == "rl")
    assert learner.status["status"] == "completed" and not learner.has("probe/lambda_max")
    assert f"{learner.name:<44} rl   adamw lr=0.0001" in out and "warm-start-sft" in out.split("learning")[-1]
    runs = {r.path.parent.name: r for r in all_runs if r.name != "warm-start-sft" and r is not learner}
    assert set(runs) == {"sft", "lora_r8", "rl", "cohen2021"}
    warm = next(r for r in all_runs if r.name == "warm-start-sft")
    assert runs["rl"].config["model"]["name"] == str(warm.path / "checkpoints" / "final_model")
    for name, run in runs.items():
        assert run.status["status"] == "completed", (name, run.status)
        assert run.has("probe/lambda_max")
    assert runs["lora_r8"].lora_rank == 8 and runs["rl"].regime == "rl"
    html = index.read_text()
    assert html.count("<img") == 6  # one figure per study and optimizer (rl: sgd, adamw), + the warm start
    assert "base" in html and "final" in html  # samples side by side
    phases = json.loads((index.parent / "phases.json").read_text())
    assert len(phases) == 6
    # rerunning skips every finished run
    run_demo(cfg)
    assert capsys.readouterr().out.count("[done]") == 5

"""experiments/bench/probe_speed.py end to end at toy size: every solver it times lands within the accuracy it
claims (a bench whose rows miss it would compare nothing), on both its setups. Speed is not asserted here: the
bench prints ratios (the brief: no timed unit tests); hessian-eigenthings / PyHessian rows are checked when the
`bench` extra is installed and skipped by the bench itself otherwise."""

import importlib.util

from experiments.bench.probe_speed import TRACK_HET, BenchConfig, main

TOY = dict(batch=4, repeats=2, seeds=1, cost_reps=1, track_points=2, track_every=2)


AS_USERS_RUN_THEM = ("hessian-eigenthings, 20 steps", "pyhessian, own stop rule")   # accuracy as it comes


def _check(result, rel_acc):
    ref = result["reference"]
    timed = {name: row for name, row in result["cold"].items() if not isinstance(row, str)}
    assert {"probes (own stop rule)", "probes eigenvalue stop", "probes (oracle stop)"} <= set(timed)
    for name, row in timed.items():
        if name not in AS_USERS_RUN_THEM:
            assert abs(row["value"] - ref) <= rel_acc * abs(ref) and row["hvps"] > 0, (name, row, ref)
    assert result["tracking"], "tracking produced no complete rows"
    if importlib.util.find_spec("hessian_eigenthings") is not None:   # warm-started along the run, as ours
        assert TRACK_HET in result["tracking"], result["tracking"].keys()
    for total in result["tracking"].values():
        assert len(total["round_seconds"]) == TOY["repeats"] and all(t > 0 for t in total["round_seconds"])
    for name, total in result["tracking"].items():
        assert total["points"] == TOY["track_points"] and total["max_rel_err"] <= rel_acc, (name, total)
    assert set(result["hvp_cost_G"]) == {"cache", "recompute", "fd"}
    assert all(cost > 0 for cost in result["hvp_cost_G"].values())


def test_tiny_random_neox(capsys):
    cfg = BenchConfig(hidden=16, layers=1, heads=2, vocab=50, seq=12, chunk=4, pretrain_steps=5, **TOY)
    _check(main(cfg), cfg.rel_acc)
    assert "each on the frozen probe batch" in capsys.readouterr().out


def test_sft_on_a_local_model_dir(tiny_model_dir):
    cfg = BenchConfig(model=str(tiny_model_dir), **TOY)
    _check(main(cfg), cfg.rel_acc)


def test_tracking_on_fresh_minibatches_without_the_cold_tables(capsys):
    cfg = BenchConfig(hidden=16, layers=1, heads=2, vocab=50, seq=12, chunk=4, pretrain_steps=5, cold=False,
                      track_batch="fresh", **TOY)
    result = main(cfg)
    assert result["cold"] == {} and "reference" not in result
    for name, total in result["tracking"].items():
        assert total["points"] == TOY["track_points"] and total["max_rel_err"] <= cfg.rel_acc, (name, total)
    out = capsys.readouterr().out
    assert "each on a fresh minibatch" in out and "cold start" not in out

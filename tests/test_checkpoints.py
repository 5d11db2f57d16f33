"""Checkpoints and resume: safe loading, verification with fallback, metrics.jsonl repair, divergence.
(The probes-on bitwise resume test sits beside its probes-off twin in test_trainer.py.)"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from agents.optim import OptimConfig
from agents.trainer import checkpoint_dirs, read_metrics
from probes import ProbeConfig, Prober
from test_trainer import _params, data, make_trainer  # noqa: F401  (data is a fixture)


class Payload:
    """Unpickling this writes ``marker``: stands in for a crafted checkpoint file that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def rewrite_manifest(ckpt: Path) -> None:
    """What an attacker who can write the run dir does: make the manifest match the tampered files."""
    manifest = ckpt / "manifest.json"
    if manifest.exists():
        files = sorted(p.name for p in ckpt.iterdir() if p.is_file() and p.name != "manifest.json")
        manifest.write_text(json.dumps({"sha256": {f: hashlib.sha256((ckpt / f).read_bytes()).hexdigest()
                                                   for f in files}}))


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


@pytest.mark.parametrize("victim", ["rng.pt", "optimizer.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_run(tiny_model_dir, tmp_path, data, victim):
    run_dir, marker = tmp_path / "run", tmp_path / "payload_ran"
    make_trainer(tiny_model_dir, run_dir, data, steps=2).train()
    ckpt = checkpoint_dirs(run_dir)[-1][1]
    torch.save({"torch": Payload(marker)}, ckpt / victim)
    rewrite_manifest(ckpt)
    resumed = make_trainer(tiny_model_dir, run_dir, data, steps=4)
    with pytest.raises(Exception) as e, pytest.warns(UserWarning, match="refused"):
        resumed.train()
    assert not marker.exists()
    assert type(e.value).__name__ == "CheckpointError"
    assert len(str(e.value).splitlines()) == 1 and "refused" in str(e.value) and victim in str(e.value)
    assert status(run_dir)["status"] == "failed"
    with pytest.raises(Exception, match="refused"):
        resumed.load_checkpoint(ckpt)
    assert not marker.exists()


def test_every_checkpoint_file_loads_with_weights_only(tiny_model_dir, tmp_path, data):
    """PPO mid-buffer (regime.pt) with probes on (probe.safetensors): nothing needs a full unpickler."""
    prober = Prober(ProbeConfig(every=1, batch_sharpness_every=0, max_hvps=4))
    make_trainer(tiny_model_dir, tmp_path, data, steps=3, regime="rl", prober=prober).train()
    ckpt = checkpoint_dirs(tmp_path)[-1][1]
    assert {"regime.pt", "optimizer.pt", "rng.pt", "probe.safetensors", "manifest.json"} <= \
        {p.name for p in ckpt.iterdir()}
    for f in ckpt.glob("*.pt"):
        torch.load(f, weights_only=True)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_low_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # model.safetensors: the lowest mantissa bit of the last weight
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, victim", [
    (_truncate, "model.safetensors"), (_flip_low_bit, "model.safetensors"), (_truncate, "optimizer.pt"),
    (_flip_low_bit, "rng.pt"), (lambda p: p.unlink(), "optimizer.pt"), (_truncate, "state.json"),
])
def test_a_corrupt_checkpoint_falls_back_to_the_previous_intact_one(tiny_model_dir, tmp_path, data, damage, victim):
    straight = make_trainer(tiny_model_dir, tmp_path / "a", data, steps=6, checkpoint_every=2)
    straight.train()
    make_trainer(tiny_model_dir, tmp_path / "b", data, steps=4, checkpoint_every=2).train()
    damage(tmp_path / "b" / "checkpoints" / "step_4" / victim)
    resumed = make_trainer(tiny_model_dir, tmp_path / "b", data, steps=6, checkpoint_every=2)
    with pytest.warns(UserWarning, match="step_4"):
        assert resumed.train() == "completed"
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # replayed from step_2: the same trajectory
    assert read_metrics(tmp_path / "a", wall_clock=False) == read_metrics(tmp_path / "b", wall_clock=False)


def test_no_intact_checkpoint_fails_in_one_line_with_status_failed(tiny_model_dir, tmp_path, data):
    make_trainer(tiny_model_dir, tmp_path, data, steps=4, checkpoint_every=2).train()
    for step, path in checkpoint_dirs(tmp_path):
        _flip_low_bit(path / "model.safetensors")
    with pytest.raises(Exception) as e, pytest.warns(UserWarning, match="sha256"):
        make_trainer(tiny_model_dir, tmp_path, data, steps=6, checkpoint_every=2).train()
    assert type(e.value).__name__ == "CheckpointError"
    assert len(str(e.value).splitlines()) == 1 and "intact" in str(e.value)
    assert status(tmp_path)["status"] == "failed" and status(tmp_path)["step"] == 4  # how far the run got


def test_a_torn_last_metrics_line_is_dropped_on_resume(tiny_model_dir, tmp_path, data):
    make_trainer(tiny_model_dir, tmp_path / "a", data, steps=6).train()
    make_trainer(tiny_model_dir, tmp_path / "b", data, steps=3).train()
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/lo')  # a crash in the middle of an append
    with pytest.warns(UserWarning, match="torn"):
        make_trainer(tiny_model_dir, tmp_path / "b", data, steps=6).train()
    assert read_metrics(tmp_path / "a", wall_clock=False) == read_metrics(tmp_path / "b", wall_clock=False)


@pytest.mark.parametrize("loss", ["all", "row 3", "garbled row 3"])
def test_rows_lost_from_metrics_are_regenerated_from_an_older_state(tiny_model_dir, tmp_path, data, loss):
    """metrics.jsonl deleted (or a row removed or garbled) mid-run: the resume replays from a checkpoint before the first
    missing row (step 0 = the initial state), so every row is back, identical to an uninterrupted run."""
    make_trainer(tiny_model_dir, tmp_path / "a", data, steps=6, checkpoint_every=2).train()
    make_trainer(tiny_model_dir, tmp_path / "b", data, steps=4, checkpoint_every=2).train()
    metrics = tmp_path / "b" / "metrics.jsonl"
    if loss == "all":
        metrics.unlink()
    elif loss == "garbled row 3":
        lines = metrics.read_text().splitlines(keepends=True)
        lines[3] = lines[3][:10] + "\x00\x17" + lines[3][12:]
        metrics.write_text("".join(lines))
    else:
        metrics.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(tmp_path / "b") if r["step"] != 3))
    with pytest.warns(UserWarning, match="no row for step"):
        make_trainer(tiny_model_dir, tmp_path / "b", data, steps=6, checkpoint_every=2).train()
    assert read_metrics(tmp_path / "a", wall_clock=False) == read_metrics(tmp_path / "b", wall_clock=False)


def test_a_diverged_run_keeps_the_last_good_state(tiny_model_dir, tmp_path, data):
    """Default cadence (no checkpoint before the divergence): the state before the first over-threshold loss is
    saved, and it is the very state a checkpoint_every=1 run saved at that step, the probes' warm starts and last
    update included (the saved copy shares them with the prober: they are replaced, never mutated)."""
    sgd = OptimConfig(name="sgd", lr=10.0, momentum=0.9, weight_decay=0.0)

    def prober():
        return Prober(ProbeConfig(every=1, max_hvps=4, critical_every=0))

    t = make_trainer(tiny_model_dir, tmp_path / "sparse", data, steps=30, checkpoint_every=250, divergence_loss=8.0,
                     optim=sgd, prober=prober())
    assert t.train() == "diverged"
    bad = status(tmp_path / "sparse")["step"]
    assert bad >= 2  # a step-(bad-1) checkpoint of the dense run exists to compare with
    assert [s for s, _ in checkpoint_dirs(tmp_path / "sparse")] == [bad - 1]
    losses = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "sparse") if "train/loss" in r}
    assert losses[bad - 1] <= 8.0 and (losses[bad] is None or losses[bad] > 8.0)
    dense = make_trainer(tiny_model_dir, tmp_path / "dense", data, steps=30, checkpoint_every=1, divergence_loss=8.0,
                         optim=sgd, prober=prober())
    assert dense.train() == "diverged"
    for f in ("model.safetensors", "optimizer.pt", "rng.pt", "probe.safetensors", "state.json"):
        a = (tmp_path / "sparse" / "checkpoints" / f"step_{bad - 1}" / f)
        b = (tmp_path / "dense" / "checkpoints" / f"step_{bad - 1}" / f)
        if f == "state.json":
            drop = lambda s: {k: v for k, v in json.loads(s).items() if k != "time"}  # noqa: E731
            assert drop(a.read_text()) == drop(b.read_text())
        else:
            assert a.read_bytes() == b.read_bytes()

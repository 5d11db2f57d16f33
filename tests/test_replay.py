"""Replay of pre-training text in SFT: the chunks sum to (1 − α) L_task + α L_lm, computed here from scratch, the
stream resumes exactly from its cursor, and misuse is a config error before training."""
import json

import pytest
import torch
import torch.nn.functional as F

import envs
from agents.policy import LMPolicy
from agents.replay import ReplayConfig, ReplayStream, config_errors
from agents.sft import SFTRegime, stream_indices
from experiments.errors import ConfigError
from experiments.run import RunConfig, replace, validate

TEXTS = [f"The function number {i} returns the sum of its arguments, or raises ValueError." for i in range(40)]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return LMPolicy.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tasks():
    return envs.load_tasks("ArithRLVR-v0", "train", 12)


def _manual_task_ce(policy, tasks):
    tok, total, count = policy.tokenizer, 0.0, 0
    for t in tasks:
        p = tok(t.prompt)["input_ids"]
        c = tok(t.demonstration, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        logits = policy.model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1]
        total = total + F.cross_entropy(logits.float(), torch.tensor(c), reduction="sum")
        count += len(c)
    return total / count


def _manual_lm_ce(policy, windows):
    """Token-mean next-token CE over whole windows (every token after the first is predicted)."""
    total, count = 0.0, 0
    for w in windows:
        logits = policy.model(input_ids=torch.tensor([w])).logits[0, :-1]
        total = total + F.cross_entropy(logits.float(), torch.tensor(w[1:]), reduction="sum")
        count += len(w) - 1
    return total / count


def test_stream_cuts_eos_separated_windows(policy):
    stream = ReplayStream(TEXTS, policy.tokenizer, window=16, pool=10, seed=0)
    eos = policy.tokenizer.eos_token_id
    first = policy.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"] + [eos]
    assert len(stream) == 10 and all(len(w) == 16 for w in stream.windows)
    assert sum(stream.windows, [])[:len(first)] == first  # consecutive cuts of the EOS-joined texts


@pytest.mark.parametrize("alpha", [0.25, 0.6])
def test_mixed_chunks_sum_to_weighted_objective(policy, tasks, alpha):
    stream = ReplayStream(TEXTS, policy.tokenizer, window=16, pool=12, seed=3)
    regime = SFTRegime(tasks, micro_batch=3, grad_accum=2, seed=1, replay=stream, replay_weight=alpha,
                       replay_windows=5)
    chunks, metrics = regime.next_batch(policy, 0)
    batch_tasks = [tasks[i] for i in stream_indices(len(tasks), 1, 0, 6)]
    windows = [stream.windows[i] for i in stream_indices(12, 3, 0, 5)]
    with torch.no_grad():
        ours = sum(regime.loss(policy, c) for c in chunks)
        truth = (1 - alpha) * _manual_task_ce(policy, batch_tasks) + alpha * _manual_lm_ce(policy, windows)
        parts = {}
        for c in chunks:
            for k, v in regime.loss_and_stats(policy, c)[1].items():
                parts[k] = parts.get(k, 0.0) + v
    assert ours.item() == pytest.approx(truth.item(), rel=1e-5)
    assert parts["train/task_loss"] == pytest.approx(_manual_task_ce(policy, batch_tasks).item(), rel=1e-5)
    assert parts["train/replay_loss"] == pytest.approx(_manual_lm_ce(policy, windows).item(), rel=1e-5)
    assert regime.replay_cursor == 5 and metrics["train/tokens"] == sum(c["n_tokens"] for c in chunks)


def test_replay_stream_resumes_from_its_cursor(policy, tasks):
    def regime():
        return SFTRegime(tasks, micro_batch=4, grad_accum=1, seed=2, replay_weight=0.3, replay_windows=3,
                         replay=ReplayStream(TEXTS, policy.tokenizer, window=16, pool=7, seed=2))

    straight = regime()
    ids = [torch.cat([c["input_ids"].flatten() for c in straight.next_batch(policy, t)[0]]) for t in range(5)]
    first = regime()
    for t in range(2):
        first.next_batch(policy, t)
    resumed = regime()
    resumed.load_state_dict(first.state_dict())
    again = [torch.cat([c["input_ids"].flatten() for c in resumed.next_batch(policy, t)[0]]) for t in range(2, 5)]
    assert all(torch.equal(a, b) for a, b in zip(ids[2:], again))
    assert first.state_dict() == {"cursor": 8, "replay_cursor": 6}


def test_config_errors_name_every_bad_field():
    assert config_errors(ReplayConfig()) == []
    errors = config_errors(ReplayConfig(weight=1.0, windows=0, pool=-1))
    assert [e.split("=")[0] for e in errors] == ["replay.weight", "replay.windows", "replay.pool"]


def test_run_config_rejects_replay_without_a_source(tmp_path, tiny_model_dir):
    base = RunConfig(out_dir=str(tmp_path), replay=ReplayConfig(weight=0.2))
    with pytest.raises(ConfigError, match="replay.source='auto' knows pre-training text only"):
        validate(replace(base, model={"name": str(tiny_model_dir)}))
    with pytest.raises(ConfigError, match="applies to SFT only"):
        validate(replace(base, regime="rl"))
    with pytest.raises(ConfigError, match="is not a file"):
        validate(replace(base, replay={"source": str(tmp_path / "missing.json")}))
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps(TEXTS))
    validate(replace(base, model={"name": str(tiny_model_dir)}, replay={"source": str(texts)}))

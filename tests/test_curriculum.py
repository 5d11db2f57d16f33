"""Difficulty as a reset option on the arithmetic envs, and the success-driven Curriculum scheduler."""

from __future__ import annotations

import io

import gymnasium as gym
import pytest
import torch

import envs
from envs.arith import DIFFICULTY_LEVELS, HARD, ArithConfig
from envs.curriculum import Curriculum, CurriculumConfig


@pytest.mark.parametrize("env_id", ["ArithRLVR-v0", "ArithRLVR-hard-v0", "ArithToolRLVR-v0"])
def test_every_level_draws_its_knobs_and_its_demonstrations_score_one(env_id):
    env = gym.make(env_id)
    for level, cfg in enumerate(DIFFICULTY_LEVELS):
        for seed in range(40):
            _, info = env.reset(seed=seed, options={"difficulty": level})
            meta = info["meta"]
            assert meta["difficulty"] == level and info["task_id"].endswith(f"@d{level}")
            assert (meta["max_digits"], meta["ops"], meta["max_ops"]) == (cfg.max_digits, cfg.ops, cfg.max_ops)
            if env_id != "ArithToolRLVR-v0":
                assert env.step(info["demonstration"])[1] == 1.0


def test_default_generation_is_untouched_and_level_2_is_arithrlvr_v0():
    assert DIFFICULTY_LEVELS[2] == ArithConfig() and DIFFICULTY_LEVELS[-1] == HARD
    plain, leveled = gym.make("ArithRLVR-v0"), gym.make("ArithRLVR-v0")
    for seed in range(100):
        p, i = plain.reset(seed=seed)
        q, j = leveled.reset(seed=seed, options={"difficulty": 2})
        assert p == q and i["answer"] == j["answer"] and j["task_id"] == i["task_id"] + "@d2"
        assert plain.reset(seed=seed) == gym.make("ArithRLVR-v0").reset(seed=seed)
    assert leveled.reset(seed=0, options={"difficulty": 2, "split": "test", "index": 5})[0] == \
        envs.make_unwrapped("ArithRLVR-v0").task(5, "test").prompt
    # test-split tasks at a level still come from the level's hash partition
    env = envs.make_unwrapped("ArithRLVR-v0")
    assert env.reset(options={"difficulty": 0, "split": "test"})[1]["task_id"].startswith("arith/test/")


def test_levels_get_harder_by_answer_size():
    env = envs.make_unwrapped("ArithRLVR-v0")
    medians, ops = [], []
    for level in range(len(DIFFICULTY_LEVELS)):
        infos = [env.reset(seed=s, options={"difficulty": level})[1] for s in range(400)]
        medians.append(sorted(abs(int(i["answer"])) for i in infos)[200])
        ops.append(sum(i["meta"]["n_ops"] for i in infos) / 400)
    # 0 -> 1 adds subtraction (smaller answers, a new operation); from there on answers grow
    assert max(medians[:2]) <= 18 and medians[1:] == sorted(medians[1:]) and medians[-1] > 500, medians
    assert ops == sorted(ops) and ops[-1] > ops[-2] > 1.0, ops  # the last level (HARD) adds operations


def test_bad_difficulty_raises():
    env = gym.make("ArithRLVR-v0")
    for bad in (-1, 6, "1", 1.0, True):
        with pytest.raises(ValueError, match="difficulty"):
            env.reset(options={"difficulty": bad})
    with pytest.raises(ValueError, match="unknown reset option"):
        gym.make("InstructRLVR-v0").reset(options={"difficulty": 1})  # only the arithmetic envs have levels


def test_rule_raises_lowers_and_waits_for_a_full_window():
    c = Curriculum(n_levels=4, window=10)
    assert c.update([1.0] * 9) == 0  # window not full yet
    assert c.update([1.0]) == 1 and len(c.outcomes) == 0 and c.moves == 1
    assert c.update([0.0] * 10) == 0
    assert c.update([1.0, 0.0] * 5) == 0 and c.last_block_success == 0.5  # between the thresholds: stay
    assert c.update([1.0] * 8) == 0 and len(c.outcomes) == 8  # blocks do not overlap: this one is not full yet
    assert c.update([0.0] * 2) == 1  # 8 of 10 -> 0.8 >= raise_at
    assert c.update([0.99] * 10) == 0  # a reward below success_reward is a failure
    c = Curriculum(n_levels=2, window=2, start=1)
    assert c.update([1.0] * 10) == 1 and c.moves == 0  # no level above the last
    assert c.update([0.0] * 2) == 0 and c.update([0.0] * 10) == 0  # none below the first


def test_hysteresis_holds_a_level_against_noise():
    import numpy as np

    c = Curriculum(n_levels=5, window=64)
    rng = np.random.default_rng(0)
    c.update([1.0] * 64)
    assert c.level == 1
    c.update((rng.random(64 * 200) < 0.5).astype(float))  # success rate 0.5: inside (0.2, 0.8), never moves
    assert c.level == 1 and c.moves == 1
    c.update((rng.random(64 * 3) < 0.9).astype(float))  # a real improvement moves it within a few blocks
    assert c.level >= 2


def test_closed_loop_settles_at_the_policys_frontier():
    """A policy that solves levels <= 2 and nothing harder: the schedule reaches 3, drops back, and never skips."""
    c = Curriculum(n_levels=len(DIFFICULTY_LEVELS), window=8)
    visited = []
    for _ in range(200):
        c.update([1.0 if c.level <= 2 else 0.0] * 4)
        visited.append(c.level)
    assert max(visited) == 3 and set(visited[-50:]) <= {2, 3}
    assert all(abs(a - b) <= 1 for a, b in zip(visited, visited[1:]))


def test_state_dict_round_trips_through_a_weights_only_checkpoint():
    rewards = [1.0] * 30 + [0.0, 1.0] * 20 + [0.0] * 25
    whole = Curriculum(n_levels=6, window=12)
    whole.update(rewards)
    first = Curriculum(n_levels=6, window=12)
    first.update(rewards[:37])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = Curriculum(n_levels=6, window=12)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    resumed.update(rewards[37:])
    assert resumed.state_dict() == whole.state_dict() and whole.moves >= 2
    with pytest.raises(ValueError, match="differs"):
        Curriculum(n_levels=6, window=5).load_state_dict(whole.state_dict())


def test_metrics_options_and_config_validation():
    c = Curriculum(CurriculumConfig(n_levels=3, start=1))
    assert c.options() == {"difficulty": 1}
    m = c.metrics()
    assert m["curriculum/level"] == 1.0 and m["curriculum/success"] != m["curriculum/success"]  # NaN before any
    for bad in ({"n_levels": 0}, {"n_levels": 2, "start": 2}, {"n_levels": 2, "window": 0},
                {"n_levels": 2, "raise_at": 0.2, "lower_at": 0.5}):
        with pytest.raises(ValueError):
            CurriculumConfig(**bad)


def test_curriculum_doctest():
    import doctest

    import envs.curriculum

    result = doctest.testmod(envs.curriculum)
    assert result.attempted > 0 and result.failed == 0


def test_small_levels_give_every_problem_they_have():
    """tasks(n, at_most=True) on a problem space smaller than n: all of its distinct problems, not an error; the
    curriculum's level lists are the RL pool of each level, disjoint from SFT's."""
    from envs.config import EnvConfig, curriculum_levels
    from envs.core import pool_of

    one_digit = envs.make_unwrapped("ArithRLVR-v0", max_digits=1, ops="+")
    with pytest.raises(ValueError, match="too small"):
        one_digit.tasks("train", 1000)
    got = one_digit.tasks("train", 1000, at_most=True)
    keys = {t.meta["key"] for t in got}
    assert len(keys) == len(got) and 60 <= len(got) <= 100  # ~90 % of the 100 one-digit sums are train problems
    env = envs.make_unwrapped("ArithRLVR-v0", dataset_size=500)
    levels = curriculum_levels(env, EnvConfig(n_train=40))
    assert len(levels) == len(DIFFICULTY_LEVELS) and all(0 < len(t) <= 40 for t in levels)
    assert all(pool_of(env.split_key(t)) == "rl" for t in levels[0] + levels[-1])
    assert all(t.meta["max_digits"] == 1 for t in levels[0]) and levels[2][:5] == [
        t for t in env.tasks("train") if pool_of(env.split_key(t)) == "rl"][:5]

"""ArithToolRLVR-v0: multi-turn protocol, env-text segments, demonstrations, calculator, checkers, fuzzing."""

from __future__ import annotations

import re
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env as gym_check_env

import envs
from envs.tool_arith import (MAX_ABS_VALUE, TOOL_STOP, ArithToolEnv, calc_call, calculate, demonstration_segments,
                             rollout, tool_reply)
from envs.wrappers import AnswerChoiceView

ID = "ArithToolRLVR-v0"


def test_registered_apart_from_the_single_turn_ids():
    assert ID in envs.SUITE_IDS and ID not in envs.ENV_IDS
    assert isinstance(gym.make(f"envs:{ID}").unwrapped, ArithToolEnv)


def test_gymnasium_check_env():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(gym.make(ID).unwrapped, skip_render_check=True)


@pytest.mark.filterwarnings("ignore:.*different from the unwrapped version")
def test_sb3_check_env_through_answer_choice_view():
    """SB3 sees a numeric bandit view: one Discrete answer per episode, so the policy never calls the tool there
    (SB3 has no text actions); the multi-turn protocol itself is what the gymnasium checker covers."""
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    view = AnswerChoiceView(gym.make(ID), obs_len=32)
    sb3_check_env(view, warn=True)
    gym_check_env(view, skip_render_check=True)
    for seed in range(50):  # choosing the right answer scores 1 in one step
        _, info = view.reset(seed=seed)
        if info["answer"] in view.answers:
            assert view.step(view.answers.index(info["answer"]))[1:3] == (1.0, True)


def test_demonstrations_replay_to_reward_one_with_exact_segments():
    env = gym.make(ID)
    for seed in range(500):
        prompt, info = env.reset(seed=seed)
        assert env.observation_space.contains(prompt) and info["segments"] == ((prompt, True),)
        turns = info["demonstration_turns"]
        replies = []
        for k, turn in enumerate(turns):
            assert env.action_space.contains(turn)
            obs, reward, terminated, truncated, step_info = env.step(turn)
            assert env.observation_space.contains(obs)
            if k < len(turns) - 1:
                assert (reward, terminated, truncated) == (0.0, False, False) and step_info["tool_call"]
                replies.append(obs)
        assert (reward, terminated, truncated) == (1.0, True, False) and step_info["correct"]
        segments = step_info["segments"]
        assert "".join(t for t, _ in segments) == prompt + info["demonstration"]
        assert [t for t, is_env in segments if is_env] == [prompt] + replies  # env text = prompt + env replies
        assert [t for t, is_env in segments if not is_env] == turns
        task = env.unwrapped.task(int(info["task_id"].split("/")[-1]))
        assert demonstration_segments(task) == list(segments)
        assert env.unwrapped.score(info["demonstration"], info["answer"]) == 1.0  # transcript = one completion


def test_demonstration_calls_the_tool_on_the_problem():
    env = envs.make_unwrapped(ID)
    for i in range(300):
        task = env.task(i)
        expr = calc_call(task.meta["turns"][0])
        assert expr == task.meta["key"] and calculate(expr)[0] == int(task.answer) == eval(expr)
        assert task.demonstration.endswith(f"<result>{task.answer}</result>\nAnswer: {task.answer}")


def test_calculator_matches_python_and_refuses_what_it_does_not_support():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        n = int(rng.integers(1, 5))
        parts = [str(int(rng.integers(0, 1000)))]
        for _ in range(n):
            parts += [str(rng.choice(list("+-*"))), str(int(rng.integers(0, 1000)))]
        if rng.random() < 0.3 and n >= 2:
            parts[0] = "(" + parts[0]
            parts[2] += ")"
        expr = " ".join(parts) if rng.random() < 0.5 else "".join(parts)
        assert calculate(expr) == (eval(expr), None), expr
    assert calculate("-(2-5)*3") == (9, None) and calculate("--4") == (4, None)
    for bad, why in [("1/2", "unsupported character '/'"), ("2**3", "malformed"), ("((1)", "unbalanced"),
                     ("", "empty"), ("1 2", "malformed"), ("9" * 19, "too large"), ("1" * 65, "longer than"),
                     ("__import__('os')", "unsupported"), ("é", "unsupported character '\\xe9'")]:
        value, error = calculate(bad)
        assert value is None and why in error, (bad, error)
    assert calculate("99999*99999*99999*99999")[1] == "value too large" and MAX_ABS_VALUE == 10**18


def test_turn_rule_tool_call_reply_and_final_answer():
    assert calc_call("think <calc>1+2</calc> more <calc>5</calc>") == "1+2"  # the first call only
    assert calc_call("<calc>1+2") is None and calc_call("Answer: 3") is None
    assert tool_reply("<calc>6*7</calc>") == "\n<result>42</result>\n"
    assert tool_reply("<calc>6/7</calc>") == "\n<result>error: unsupported character '/'</result>\n"
    assert TOOL_STOP == "</calc>" and TOOL_STOP in tool_reply.__doc__ + "</calc>"


def test_hedges_across_turns_and_formats():
    strict, lenient = gym.make(ID), gym.make(ID, answer_format="lenient")
    for env, final, expected in [(strict, "**Answer:** {a}", 0.0), (lenient, "**Answer:** {a}", 1.0),
                                 (strict, "Answer: {a}", 1.0), (lenient, "\\boxed{{{a}}}", 1.0)]:
        _, info = env.reset(seed=1)
        env.step("<calc>1+1</calc>")
        assert env.step(final.format(a=info["answer"]))[1] == expected
    _, info = strict.reset(seed=1)
    strict.step(f"Answer: {int(info['answer']) + 1}\n<calc>1+1</calc>")  # a wrong marked answer in a tool turn
    assert strict.step(f"Answer: {info['answer']}")[1] == 0.0  # ... conflicts with the final one: a hedge
    _, info = strict.reset(seed=1)
    assert strict.step(info["answer"])[1:3] == (0.0, True)  # a bare number is a final turn without a marker


def test_max_turns_truncates_and_malformed_actions_end_the_episode():
    env = gym.make(ID, max_turns=2)
    env.reset(seed=0)
    assert env.step("<calc>1</calc>")[2:4] == (False, False)
    obs, reward, terminated, truncated, info = env.step("<calc>2</calc>")
    assert (obs, reward, terminated, truncated) == ("", 0.0, False, True) and "2 turns" in info["truncated_reason"]
    assert env.step("Answer: 1")[1:3] == (0.0, True) and "call reset" in env.step("x")[4]["error"]
    _, info = env.reset(seed=0)
    env.step("<calc>1</calc>")
    assert env.step(f"Answer: {info['answer']}")[1:4] == (1.0, True, False)  # the last allowed turn is scored
    for bad in (None, 3, b"Answer: 1", ["x"], "\ud800", "x" * 5000):
        env.reset(seed=0)
        env.step("<calc>1</calc>")
        obs, reward, terminated, truncated, info = env.step(bad)
        assert (obs, reward, terminated, truncated) == ("", 0.0, True, False) and info["error"]
    with pytest.raises(ResetNeeded):
        envs.make_unwrapped(ID).step("x")
    with pytest.raises(ValueError, match="max_turns"):
        gym.make(ID, max_turns=0)


def _random_turn(rng, answer: str):
    kind = rng.integers(9)
    if kind == 0:
        return [None, 3, b"x", ["a"], "\ud800", "y" * 4097, 2.5][int(rng.integers(7))]
    pieces = ["<calc>", "</calc>", "Answer: ", "answer:", answer, "1", "-", "*", "(", ")", "/", " ", "\n", "é",
              "<result>", "99999999", "\\boxed{", "}"]
    return "".join(pieces[i] for i in rng.integers(len(pieces), size=int(rng.integers(0, 8))))


@pytest.mark.parametrize("answer_format", ["strict", "lenient"])
def test_10k_fuzzed_turns_never_crash_and_segments_stay_exact(answer_format):
    env = gym.make(ID, answer_format=answer_format, max_turns=4)
    rng = np.random.default_rng(1)
    steps, seed = 0, 0
    while steps < 10_000:
        prompt, info = env.reset(seed=seed)
        seed += 1
        env_text, done = [prompt], False
        while not done:
            action = _random_turn(rng, info["answer"])
            obs, reward, terminated, truncated, step_info = env.step(action)
            steps += 1
            assert 0.0 <= reward <= 1.0 and env.observation_space.contains(obs)
            assert not (terminated and truncated)
            done = terminated or truncated
            if not done:
                assert reward == 0.0 and step_info["tool_call"] and obs.startswith("\n<result>")
                env_text.append(obs)
            segments = step_info["segments"]
            assert [t for t, e in segments if e] == env_text
            if done and step_info["error"] is None and not truncated:
                transcript = "".join(t for t, _ in segments[1:])
                assert env.unwrapped.score(transcript, info["answer"]) == reward


def test_reset_is_deterministic_per_seed_and_replies_too():
    a, b = gym.make(ID), gym.make(ID)
    for seed in (0, 1, 99):
        assert a.reset(seed=seed) == b.reset(seed=seed)
        assert a.step("<calc>12*(3-5)</calc>") == b.step("<calc>12*(3-5)</calc>")
    assert [a.reset()[0] for _ in range(5)] == [b.reset()[0] for _ in range(5)]


def test_difficulty_option_and_rollout_helper():
    env = gym.make(ID)
    for level in range(6):
        _, info = env.reset(seed=2, options={"difficulty": level})
        assert info["task_id"].endswith(f"@d{level}") and info["meta"]["difficulty"] == level
        turns = iter(info["demonstration_turns"])
        episode = rollout(env, lambda transcript: next(turns), seed=2, options={"difficulty": level})
        assert episode.reward == 1.0 and episode.terminated and episode.turns == 2
        assert episode.transcript.endswith(info["demonstration"])

    def solver(transcript: str) -> str:  # calls the tool on the prompt's expression, then answers its result
        results = re.findall(r"<result>(-?\d+)</result>", transcript)
        if results:
            return f"Answer: {results[-1]}"
        return "<calc>" + re.search(r"Compute (.+?)\. Tool", transcript)[1] + "</calc>"

    assert [rollout(env, solver, seed=s).reward for s in range(50)] == [1.0] * 50


def test_train_and_test_never_share_a_problem():
    env = envs.make_unwrapped(ID, dataset_size=2000)
    train, test = env.tasks("train"), env.tasks("test")
    assert not {env.split_key(t) for t in train} & {env.split_key(t) for t in test}


def test_throughput_bench_covers_the_tool_env():
    from experiments.bench.env_throughput import bench_tool_env

    rates = bench_tool_env(0.05)
    assert set(rates) == {"made", "raw"} and min(rates.values()) > 1000  # measured ~13k turns/s; loose on a busy box

"""envs: registration, gymnasium/SB3 checkers, determinism, demonstrations, splits, bad input, reward hacking."""

from __future__ import annotations

import re
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env as gym_check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import envs
from envs.arith import HARD, arithmetic_corpus, column_steps, split_key
from envs.core import split_of
from envs.instruct import FAMILIES
from envs.vector import TaskBatch
from envs.wrappers import AnswerChoiceView

IDS = envs.ENV_IDS
PROCEDURAL = ("ArithRLVR-v0", "ArithRLVR-hard-v0", "InstructRLVR-v0")


@pytest.fixture(scope="module", params=IDS)
def env_id(request):
    return request.param


def test_every_id_registered_and_reachable_with_module_prefix():
    assert set(IDS) == {"ArithRLVR-v0", "ArithRLVR-hard-v0", "InstructRLVR-v0", "AlpacaSFT-v0"}
    for env_id in IDS:
        assert isinstance(gym.make(f"envs:{env_id}").unwrapped, envs.TextTaskEnv)


def test_gymnasium_check_env(env_id):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker's warnings (e.g. obs not in space) count as failures
        gym_check_env(gym.make(env_id).unwrapped, skip_render_check=True)


@pytest.mark.filterwarnings("ignore:.*different from the unwrapped version")
def test_sb3_check_env_through_answer_choice_view(env_id):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    view = AnswerChoiceView(gym.make(env_id), obs_len=32)
    sb3_check_env(view, warn=True)
    gym_check_env(view, skip_render_check=True)


def test_answer_choice_view_scores_the_chosen_answer():
    view = AnswerChoiceView(gym.make("ArithRLVR-v0", min_digits=1, max_digits=1, ops="+"), obs_len=16)
    assert view.answers == [str(k) for k in range(19)]  # 1-digit sums 0..18, numerically sorted
    obs, info = view.reset(seed=3)
    prompt = view.unwrapped.task(0).prompt  # any prompt: check the char-id encoding round-trips
    charset = sorted(view.unwrapped.observation_space.character_set)
    assert "".join(charset[i - 1] for i in view.encode(prompt) if i) == prompt[:16]
    right = view.answers.index(info["answer"])
    assert view.step(right)[1] == 1.0
    view.reset(seed=3)
    assert view.step((right + 1) % len(view.answers))[1] == 0.0


def test_demonstrations_score_one_for_1000_seeds_and_stay_in_spaces(env_id):
    env = gym.make(env_id)
    space, act_space = env.observation_space, env.action_space
    for seed in range(1000):
        prompt, info = env.reset(seed=seed)
        assert space.contains(prompt) and act_space.contains(info["demonstration"])
        obs, reward, terminated, truncated, step_info = env.step(info["demonstration"])
        assert (obs, reward, terminated, truncated) == ("", 1.0, True, False), (prompt, info)
        assert step_info["correct"] and step_info["format_ok"] and step_info["error"] is None


@pytest.mark.parametrize("env_id", ["ArithRLVR-v0", "InstructRLVR-v0", "AlpacaSFT-v0"])
def test_default_prompts_and_answers_are_short(env_id):
    env = envs.make_unwrapped(env_id)
    tasks = [env.reset(seed=s) for s in range(300)]
    assert max(len(p) for p, _ in tasks) < 200
    assert max(len(i["answer"]) for _, i in tasks) < 40


def test_easy_arith_format_is_the_documented_one():
    env = envs.make_unwrapped("ArithRLVR-v0")
    task = env.task(0)
    m = re.fullmatch(r"Compute (\d+)([+-])(\d+)\. End with 'Answer: <number>'\.\n", task.prompt)
    assert m, task.prompt
    a, op, b = int(m[1]), m[2], int(m[3])
    value = a + b if op == "+" else a - b
    assert task.answer == str(value) and value >= 0 and a < 100 and b < 100
    assert task.demonstration == f"{column_steps(a, op, b)}\nAnswer: {value}"
    assert task.demonstration.endswith(f"\n{a}{op}{b}={value}\nAnswer: {value}")
    direct = envs.make_unwrapped("ArithRLVR-v0", working="direct").task(0)
    assert direct.demonstration == f"{a}{op}{b}={value}\nAnswer: {value}" and direct.prompt == task.prompt


@pytest.mark.parametrize("op", ["+", "-"])
def test_column_working_is_true_digit_by_digit(op):
    """Every line of the column working is a true one-digit fact of the right column, carries/borrows flow to the
    next column, and the last line is the problem with its value — for every pair of operands below 100 and
    20,000 random pairs below 1000."""
    rng = np.random.default_rng(0)
    pairs = [(a, b) for a in range(100) for b in range(100)] + [tuple(p) for p in rng.integers(0, 1000, (20_000, 2))]
    for a, b in pairs:
        a, b = (b, a) if op == "-" and a < b else (int(a), int(b))
        lines = column_steps(a, op, b).split("\n")
        assert lines[-1] == f"{a}{op}{b}={eval(f'{a}{op}{b}')}"
        carry, digits = 0, []
        for i, line in enumerate(lines[:-1]):
            lhs, rhs = line.split("=")
            terms = [int(t) for t in re.split(r"[+-]", lhs)]
            assert eval(lhs) == int(rhs)
            x, y = a // 10**i % 10, b // 10**i % 10
            if op == "+":
                assert terms == [x, y] + ([carry] if carry else []), (a, b, line)
                carry, digit = int(rhs) // 10, int(rhs) % 10
            else:
                borrow = int(terms[0] >= 10)
                assert terms == [x + 10 * borrow] + ([carry] if carry else []) + [y], (a, b, line)
                carry, digit = borrow, int(rhs)
            digits.append(digit)
        assert carry == 0 or op == "+"
        assert int("".join(map(str, reversed(digits)))) == eval(f"{a}{op}{b}")


# ---- ground truth ----
@pytest.mark.parametrize("env_id", ["ArithRLVR-v0", "ArithRLVR-hard-v0"])
def test_arith_answers_and_every_step_match_python_arithmetic(env_id):
    env = envs.make_unwrapped(env_id)
    for i in range(1500):
        task = env.task(i)
        expr = task.meta["key"]
        assert re.fullmatch(r"[0-9+\-*()]+", expr)
        value = eval(expr)  # only digits, + - * and parentheses (checked above)
        assert task.answer == str(value)
        chain = task.demonstration.split("\nAnswer:")[0].split("\n")[-1].split("=")  # after any column working
        assert chain[0] == expr and all(eval(s) == value for s in chain), task.demonstration
        if task.meta["word"]:
            a, op, b = re.fullmatch(r"(\d+)([+\-*])(\d+)", expr).groups()
            assert re.findall(r"\d+", task.prompt)[:2] == [a, b]
            assert int(a) >= int(b) or op != "-"  # nobody gives away more than they have


def test_hard_preset_uses_its_knobs():
    env = envs.make_unwrapped("ArithRLVR-hard-v0")
    tasks = [env.task(i) for i in range(2000)]
    assert {t.meta["n_ops"] for t in tasks} == {1, 2, 3}
    assert any(t.meta["word"] for t in tasks) and any("(" in t.meta["key"] for t in tasks)
    assert any("*" in t.meta["key"] for t in tasks) and any(int(t.answer) < 0 for t in tasks)
    assert max(len(d) for t in tasks for d in re.findall(r"\d+", t.meta["key"])) == 3
    assert tasks[0].meta["max_digits"] == HARD.max_digits == 3


def test_arith_knobs_override_and_bad_knobs_raise():
    env = envs.make_unwrapped("ArithRLVR-v0", min_digits=3, max_digits=3, ops="*")
    for i in range(100):
        a, b = env.task(i).meta["key"].split("*")
        assert 100 <= int(a) <= 999 and 100 <= int(b) <= 999
    for bad in ({"ops": "/"}, {"min_digits": 0}, {"max_ops": 0}, {"parens": 2.0}):
        with pytest.raises(ValueError):
            envs.make_unwrapped("ArithRLVR-v0", **bad)


def test_instruct_answers_match_independent_solutions():
    env = envs.make_unwrapped("InstructRLVR-v0")
    import json

    seen = set()
    for i in range(1500):
        t = env.task(i)
        body = t.prompt.split(" End with")[0]
        seen.add(t.family)
        if t.family == "reverse":
            expected = re.fullmatch(r"Reverse the letters of '(\w+)'\.", body)[1][::-1]
        elif t.family == "sort":
            xs = re.fullmatch(r"Sort ascending: ([\d ]+)\.", body)[1].split()
            expected = " ".join(sorted(xs, key=int))
        elif t.family == "count":
            c, w = re.fullmatch(r"How many times does '(\w)' occur in '(\w+)'\?", body).groups()
            expected = str(sum(ch == c for ch in w))
        elif t.family == "json":
            pairs = re.fullmatch(r"Write (.+) as a JSON object\.", body)[1].split(", ")
            obj = {k: int(v) if v.isdigit() else v for k, v in (p.split("=") for p in pairs)}
            assert json.loads(t.answer) == obj
            continue
        elif t.family == "upper":
            expected = re.fullmatch(r"Write '([\w ]+)' in capital letters\.", body)[1].upper()
        elif t.family == "acronym":
            expected = "".join(w[0] for w in re.fullmatch(r"Give .+ word: ([\w ]+)\.", body)[1].split())
        else:
            w, k = re.fullmatch(r"Repeat '(\w+)' (\d) times, separated by spaces\.", body).groups()
            expected = " ".join([w] * int(k))
        assert t.answer == expected, t
    assert seen == set(FAMILIES) and len(FAMILIES) == 7


def test_arithmetic_corpus_lines_are_true_train_only_and_deterministic():
    lines = arithmetic_corpus(500, seed=3)
    assert lines == arithmetic_corpus(500, seed=3) and lines != arithmetic_corpus(500, seed=4)
    for line in lines:
        parts = line.split("=")
        assert len(parts) == 2 and re.fullmatch(r"\d+[+-]\d+", parts[0]) and eval(parts[0]) == int(parts[1])
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)", parts[0]).groups()
        assert split_of(split_key([int(a), op, int(b)]), 0.1) == "train"  # split key v1: twins share a split
    assert len(arithmetic_corpus(50, 0, HARD)) == 50


# ---- determinism, seeding, splits ----
def test_reset_is_deterministic_per_seed_across_instances(env_id):
    a, b = gym.make(env_id), gym.make(env_id)
    for seed in (0, 1, 12345):
        assert a.reset(seed=seed) == b.reset(seed=seed)
    first = [a.reset(seed=7)[0]] + [a.reset()[0] for _ in range(5)]
    second = [b.reset(seed=7)[0]] + [b.reset()[0] for _ in range(5)]
    assert first == second


@pytest.mark.parametrize("env_id", PROCEDURAL)
def test_tasks_are_pure_and_seeds_are_not_shifted_copies(env_id):
    env = envs.make_unwrapped(env_id)
    other_seed = envs.make_unwrapped(env_id, base_seed=1)
    ids = range(200)
    assert [env.task(i) for i in ids] == [envs.make_unwrapped(env_id).task(i) for i in ids]
    seq0 = [env.task(i).prompt for i in range(1, 201)]
    seq1 = [other_seed.task(i).prompt for i in range(200)]
    assert sum(p == q for p, q in zip(seq0, seq1)) < 20  # seed+index schemes would make these equal
    assert env.task(5).task_id.endswith("/train/5") and env.task(5, "test").task_id.endswith("/test/5")


@pytest.mark.parametrize("env_id", PROCEDURAL)
def test_train_and_test_never_share_a_problem(env_id):
    env = envs.make_unwrapped(env_id, dataset_size=3000)
    train, test = env.tasks("train"), env.tasks("test")
    assert (len(train), len(test)) == (2700, 300)
    train_keys, test_keys = {env.problem_key(t) for t in train}, {env.problem_key(t) for t in test}
    assert len(train_keys) == 2700 and len(test_keys) == 300  # deduplicated
    assert not train_keys & test_keys
    assert not {t.prompt for t in train} & {t.prompt for t in test}
    assert not {env.split_key(t) for t in train} & {env.split_key(t) for t in test}
    # infinite mode draws respect the same partition
    assert all(split_of(env.split_key(env.task(i, "test")), 0.1) == "test" for i in range(5000, 5300))
    assert env.tasks("train", 100) == train[:100]


def _swapped(expr: str) -> str | None:
    """``b op a`` for a one-operation commutative ``a op b``, else None (independent of envs.arith.split_key)."""
    m = re.fullmatch(r"(\d+)([+*])(\d+)", expr)
    return None if m is None else m[3] + m[2] + m[1]


@pytest.mark.parametrize("env_id", ["ArithRLVR-v0", "ArithRLVR-hard-v0"])
def test_commutative_twins_share_a_split(env_id):
    # split key v0 put 366 of ArithRLVR-v0's 598 one-op commutative test problems beside their twin in train
    env = envs.make_unwrapped(env_id)
    train_keys = {t.meta["key"] for t in env.tasks("train")}
    test = env.tasks("test")
    twins = [_swapped(t.meta["key"]) for t in test if _swapped(t.meta["key"]) is not None]
    assert len(twins) > 300
    assert not [k for k in twins if k in train_keys]
    for t in test[:300]:  # the split key is the same expression: evaluates to the answer (word problems too)
        assert eval(t.meta["split_key"]) == int(t.answer)
        assert split_key(_tokens(t.meta["key"])) == t.meta["split_key"]
    # multi-op: a swap of operands of + or * anywhere in the tree gives the same key; associativity does not
    assert split_key(_tokens("3+4*5")) == split_key(_tokens("5*4+3")) != split_key(_tokens("3+5+4"))
    assert split_key(_tokens("2*(4+5)")) == split_key(_tokens("(5+4)*2")) != split_key(_tokens("(4+2)*5"))
    assert split_key(_tokens("7-2")) != split_key(_tokens("2-7"))


def _tokens(expr: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.findall(r"\d+|[-+*()]", expr)]


def test_default_arith_dataset_holds_10k_distinct_problems():
    env = envs.make_unwrapped("ArithRLVR-v0")
    train, test = env.tasks("train"), env.tasks("test")
    assert (len(train), len(test)) == (9000, 1000)
    assert not {t.meta["key"] for t in train} & {t.meta["key"] for t in test}


def test_alpaca_split_is_disjoint_and_complete():
    env = envs.make_unwrapped("AlpacaSFT-v0")
    train, test = env.tasks("train"), env.tasks("test")
    assert len(train) + len(test) == 60 and len(test) >= 1
    assert not {t.prompt for t in train} & {t.prompt for t in test}
    with pytest.raises(ValueError, match="records"):
        env.tasks("train", len(train) + 1)
    assert env.tasks("train", len(train) + 1, at_most=True) == train  # the contract of TextTaskEnv.tasks


def test_dataset_mode_reset_draws_from_the_dataset():
    env = gym.make("ArithRLVR-v0", mode="dataset", dataset_size=500)
    keys = {t.meta["key"] for t in env.unwrapped.tasks("train")}
    env.reset(seed=0)
    assert all(env.reset()[1]["meta"]["key"] in keys for _ in range(300))


def test_reset_options_pin_the_task_and_bad_options_raise():
    env = gym.make("ArithRLVR-v0")
    prompt, info = env.reset(options={"index": 17, "split": "test"})
    assert prompt == env.unwrapped.task(17, "test").prompt and info["task_id"] == "arith/test/17"
    for bad in ({"index": -1}, {"index": "3"}, {"index": 2**32}, {"split": "val"}):
        with pytest.raises(ValueError):
            env.reset(options=bad)
    for bad in ("x", ["index", 3], 3):
        with pytest.raises(ValueError, match="options must be None or a dict"):
            env.reset(options=bad)
    with pytest.raises(ValueError, match=r"unknown reset option\(s\) \['idx'\]"):
        env.reset(options={"idx": 3})
    assert env.reset(options=None)[1]["task_id"].startswith("arith/train/")


def test_small_problem_space_gives_a_clear_error():
    env = envs.make_unwrapped("ArithRLVR-v0", min_digits=1, max_digits=1, ops="+")
    with pytest.raises(ValueError, match="problem space is too small"):
        env.tasks("train", 500)


# ---- episode order and bad input ----
def test_step_before_reset_raises_reset_needed_raw_and_made():
    for env in (envs.make_unwrapped("ArithRLVR-v0"), gym.make("ArithRLVR-v0")):
        with pytest.raises(ResetNeeded):
            env.step("Answer: 1")


def test_step_after_termination_scores_zero_with_error():
    env = gym.make("ArithRLVR-v0")
    _, info = env.reset(seed=0)
    assert env.step(info["demonstration"])[1] == 1.0
    obs, reward, terminated, truncated, info2 = env.step(info["demonstration"])
    assert (obs, reward, terminated, truncated) == ("", 0.0, True, False) and "reset" in info2["error"]
    env.reset(seed=0)
    assert env.step(info["demonstration"])[1] == 1.0


BAD_ACTIONS = [None, b"Answer: 82", 82, 82.0, ["Answer: 82"], {"a": 1}, "Answer: 82" + " " * 1_000_000,
               "Answer: 82\ud800", object()]


@pytest.mark.parametrize("action", BAD_ACTIONS, ids=lambda a: type(a).__name__)
def test_bad_actions_score_zero_with_error_and_never_raise(action, env_id):
    env = gym.make(env_id)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(action)
    assert (obs, reward, terminated, truncated) == ("", 0.0, True, False)
    assert isinstance(info["error"], str) and info["error"]


# ---- verifier and reward hacking ----
POSITIVE = ["Answer: 82", "37+45=82\nAnswer: 82", "Answer:82", "Answer: +82", "Answer: 082", "Answer: 82.",
            "Answer: 82.0", "Answer: 82\nAnswer: 82", "Answer: 82\nmore text after", "  Answer:   82  "]
HACKS = ["82", "37+45=82", "Answer: 80 81 82 83", "Answer: 81\nAnswer: 82", "Answer: 82\nAnswer: 81",
         "Answer: 82 or 83", "Answer: 8,2", "Answer: 82, 83", "Compute 37+45. End with 'Answer: <number>'.\n82",
         "Compute 37+45. End with 'Answer: <number>'.", "answer: 82", "ANSWER: 82", "Answer: <number>",
         "Answer: 8 2", "Answer: 820", "Answer: -82", "Answer: 82x", "Answer:\n82", "Answer: 0x52", "Answer: 8.2e1",
         "Answer: ８２", "", "Answer: " + "1" * 5000,
         "Answer: 0,082", "Answer: 000,082", "Answer: -0,082", "Answer:\x1f82", "Answer: 8\x1f2"]


@pytest.mark.parametrize("completion", POSITIVE)
def test_arith_verifier_accepts_formats_of_the_right_answer(completion):
    assert envs.score_batch("ArithRLVR-v0", [completion], ["82"])[0] == 1.0


@pytest.mark.parametrize("completion", HACKS)
def test_reward_hacking_attempts_score_zero(completion):
    assert envs.score_batch("ArithRLVR-v0", [completion], ["82"])[0] == 0.0


# answer_format="lenient": correct answers written in other usual formats, for the answer 82
LENIENT_POSITIVE = POSITIVE + [
    "**Answer:** 82", "**Answer**: 82", "Answer: **82**", "Answer: **82**.", "\\boxed{82}",
    "37+45=82, so the answer is $\\boxed{82}$.", "answer: 82", "ANSWER: 82", "Final answer: 82", "Answer: 82 apples",
    "Answer: 82 apples.", "Answer: **82** apples", "Answer: ８２", "Answer: ٨٢", "Answer: ۸۲", "Answer: `82`",
    "Answer: \\(82\\)", "Answer: $82$", "Answer: \\boxed{82}", "Answer：82",
    "Compute 37+45. End with 'Answer: <number>'.\n37+45=82\nAnswer: 82",  # prompt echo, then the answer
]
# format-only refusals of the strict verifier that lenient accepts by design
_FORMAT_ONLY = {"answer: 82", "ANSWER: 82", "Answer: ８２"}
LENIENT_HACKS = [h for h in HACKS if h not in _FORMAT_ONLY] + [
    "\\boxed{81}\nAnswer: 82", "Answer: 82\n\\boxed{83}", "answer: 81\nAnswer: 82", "Answer: 82\nanswer: 81",
    "Answer: \\boxed{81} 82", "Answer: 82 plus one", "Answer: 82 minus 1", "Answer: 82 or so", "Answer: 82 thousand",
    "Answer: 82 83 apples", "Answer: 82 is wrong", "Answer: 82 wrong", "Answer: 82 red apples", "Answer: 8**2",
    "Answer: **8**2", "Answer: 8*2", "Answer: 8²", "Answer: ⑧②", "Answer: 8²2",
    "Answer: <number> 81\nAnswer: 82", "Answer: <number>", "\\boxed{}", "Answer: $8$2", "Answer: 82apples",
    "Answer: 82 ok\x1fok", "Answer:\x1f82", "Answer: 0,082", "answer: 000,082", "\\boxed{0,082}", "Answer: −82",
]


@pytest.mark.parametrize("completion", LENIENT_POSITIVE)
def test_lenient_arith_verifier_accepts_other_formats_of_the_right_answer(completion):
    assert envs.make_unwrapped("ArithRLVR-v0", answer_format="lenient").score(completion, "82") == 1.0
    assert envs.make_unwrapped("ArithRLVR-hard-v0", answer_format="lenient").score(completion, "82") == 1.0


@pytest.mark.parametrize("completion", LENIENT_HACKS)
def test_lenient_arith_verifier_still_pays_no_hack(completion):
    assert envs.make_unwrapped("ArithRLVR-v0", answer_format="lenient").score(completion, "82") == 0.0


def test_strict_stays_the_default_and_answer_format_is_validated():
    assert envs.make_unwrapped("ArithRLVR-v0").score("**Answer:** 82", "82") == 0.0
    assert envs.make_unwrapped("ArithRLVR-v0", answer_format="lenient").score("Answer: −82", "-82") == 1.0
    for env_id in ("ArithRLVR-v0", "ArithRLVR-hard-v0", "InstructRLVR-v0"):
        with pytest.raises(ValueError, match="answer_format must be one of"):
            envs.make_unwrapped(env_id, answer_format="loose")


def test_lenient_instruct_verifier():
    env = envs.make_unwrapped("InstructRLVR-v0", answer_format="lenient")
    for ok in ("Answer: elppa", "answer: **elppa**", "**Answer:** `elppa`", "Answer: 'elppa'", "\\boxed{elppa}",
               "Reverse the letters of 'apple'. End with 'Answer: <text>'.\nAnswer: elppa"):
        assert env.score(ok, "elppa") == 1.0, ok
    for hack in ("Answer: ELPPA", "Answer: elppa elppa", "Answer: elppa apples", "Answer: elppa\nanswer: apple",
                 "\\boxed{apple}\nAnswer: elppa", "elppa", "Answer: <text>"):
        assert env.score(hack, "elppa") == 0.0, hack
    assert env.score("Answer: ok ok ok", "ok ok ok") == 1.0
    assert env.score("Answer: ok\x1fok\x1fok", "ok ok ok") == 0.0
    ref = '{"name": "bob", "age": 7}'
    assert env.score('Answer: `{"age":7,"name":"bob"}`', ref) == 1.0
    assert env.score('Answer: {"name": "al", "name": "bob", "age": 7}', ref) == 0.0
    for ok in ("Answer: 3", "Answer: 3 times", "answer: ٣", "\\boxed{3}"):  # count answers are numbers
        assert env.score(ok, "3") == 1.0, ok
    for hack in ("Answer: 3 or 4", "Answer: 3\n\\boxed{4}", "Answer: 3²"):
        assert env.score(hack, "3") == 0.0, hack


def test_answer_format_is_an_accepted_run_kwarg():
    from experiments.run import env_kwarg_names
    for env_id in ("ArithRLVR-v0", "ArithRLVR-hard-v0", "InstructRLVR-v0"):
        assert "answer_format" in env_kwarg_names(env_id)
    assert "answer_format" not in env_kwarg_names("AlpacaSFT-v0")


def test_instruct_verifier_exactness_and_json_equivalence():
    env = envs.make_unwrapped("InstructRLVR-v0")
    assert env.score("Answer: elppa", "elppa") == 1.0
    assert env.score("Answer:   elppa  ", "elppa") == 1.0
    for hack in ("Answer: apple", "elppa", "Answer: ELPPA", "Answer: elppa elppa", "Answer: elppa\nAnswer: apple"):
        assert env.score(hack, "elppa") == 0.0, hack
    ref = '{"name": "bob", "age": 7}'
    assert env.score('Answer: {"age":7,"name":"bob"}', ref) == 1.0
    for hack in ('Answer: {"name": "bob"}', 'Answer: {"name": "bob", "age": "7"}', "Answer: {name: bob, age: 7}",
                 'Answer: {"name": "bob", "age": 7', "Answer: [[[[" + "[" * 3000,
                 # duplicate keys: json.loads keeps the last value, so both of two hedged answers would match
                 'Answer: {"name": "al", "name": "bob", "age": 7}', 'Answer: {"name": "bob", "age": 1, "age": 7}',
                 'Answer: [{"name": "bob", "name": "bob", "age": 7}]'):
        assert env.score(hack, ref) == 0.0, hack
    # control characters standing in for spaces (str.split would collapse them into one space)
    assert env.score("Answer: ok ok ok", "ok ok ok") == 1.0
    assert env.score("Answer: ok ok ok\r\n", "ok ok ok") == 1.0  # a CRLF line end is not part of the answer
    for sep in ("\x1f", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c", "\x85", "\u2028"):
        assert env.score(f"Answer: ok{sep}ok{sep}ok", "ok ok ok") == 0.0, repr(sep)
        assert env.score(f"Answer:{sep}ok ok ok", "ok ok ok") == 0.0, repr(sep)


def test_alpaca_soft_score_is_token_f1():
    env = envs.make_unwrapped("AlpacaSFT-v0")
    assert not env.verifiable and envs.make_unwrapped("ArithRLVR-v0").verifiable
    # P = 1/4, R = 1/1 -> F1 = 2 * 0.25 / 1.25 = 0.4
    assert env.score("The capital is Paris", "Paris") == pytest.approx(0.4)
    # pred "red blue blue" vs ref "red, yellow, blue": overlap 2 (red, blue), P = 2/3, R = 2/3
    assert env.score("red blue blue", "red, yellow, blue") == pytest.approx(2 / 3)
    assert env.score("### Response:\nignored\n### Response:\nParis", "Paris") == 1.0
    assert env.score("", "Paris") == 0.0 and env.score(None, "Paris") == 0.0


def test_alpaca_loads_json_and_jsonl_and_rejects_bad_files(tmp_path):
    import json

    from envs.alpaca import SAMPLE_PATH

    rows = [json.loads(line) for line in SAMPLE_PATH.read_text().splitlines()]
    as_json = tmp_path / "a.json"
    as_json.write_text(json.dumps(rows))
    a, b = envs.make_unwrapped("AlpacaSFT-v0", path=str(as_json)), envs.make_unwrapped("AlpacaSFT-v0")
    assert a.tasks("train") == b.tasks("train") and a.tasks("test") == b.tasks("test")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": 3, "output": "y"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        envs.make_unwrapped("AlpacaSFT-v0", path=str(bad))
    with pytest.raises(FileNotFoundError):
        envs.make_unwrapped("AlpacaSFT-v0", path=str(tmp_path / "missing.json"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(), st.text(alphabet="Answer: 0123456789+-.,\n"),
                 st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters()),  # surrogates
                 st.binary(), st.integers(), st.none(), st.floats(), st.lists(st.text(max_size=5)),
                 st.dictionaries(st.text(max_size=3), st.integers())))
def test_fuzzed_actions_never_raise_and_reward_only_the_last_marker_answer(action):
    for env in (FUZZ_ENVS["ArithRLVR-v0"], FUZZ_ENVS["InstructRLVR-v0"], FUZZ_ENVS["AlpacaSFT-v0"]):
        _, info = env.reset(seed=0)
        _, reward, terminated, truncated, step_info = env.step(action)
        assert terminated and not truncated and 0.0 <= reward <= 1.0
        assert env.unwrapped.score(action, info["answer"]) == reward  # step and the pure verifier agree
        if not isinstance(action, str):
            assert reward == 0.0 and step_info["error"]
        elif reward == 1.0 and env.unwrapped.verifiable:
            last = action.rsplit("Answer:", 1)[1].split("\n")[0]
            assert env.unwrapped.score("Answer: " + last, info["answer"]) == 1.0


FUZZ_ENVS = {env_id: gym.make(env_id) for env_id in ("ArithRLVR-v0", "InstructRLVR-v0", "AlpacaSFT-v0")}


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="Answer:answer \\boxed{}*_$`0123456789٨８²+-.,\n\x1f"),
                 st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters()),
                 st.binary(), st.integers(), st.none()))
def test_fuzzed_actions_never_raise_under_the_lenient_format(action):
    for env_id, answer in (("ArithRLVR-v0", "82"), ("InstructRLVR-v0", "elppa"), ("InstructRLVR-v0", "3")):
        verdict = LENIENT_ENVS[env_id].check(action, answer)
        assert 0.0 <= verdict.reward <= 1.0
        assert (verdict.reward == 1.0) == verdict.correct
        if not isinstance(action, str):
            assert verdict.reward == 0.0 and verdict.error


LENIENT_ENVS = {env_id: envs.make_unwrapped(env_id, answer_format="lenient")
                for env_id in ("ArithRLVR-v0", "InstructRLVR-v0")}



# ---- batched use, helpers, adapters ----
def test_sync_vector_env_works(env_id):
    vec = gym.make_vec(env_id, num_envs=3, vectorization_mode="sync")
    prompts, infos = vec.reset(seed=0)
    assert len(prompts) == 3 and all(isinstance(p, str) for p in prompts)
    _, rewards, terminated, truncated, _ = vec.step(tuple(infos["demonstration"]))
    assert rewards.tolist() == [1.0, 1.0, 1.0] and terminated.all() and not truncated.any()
    vec.close()


def test_async_vector_env_works_without_shared_memory():
    vec = gym.make_vec("ArithRLVR-v0", num_envs=2, vectorization_mode="async", vector_kwargs={"shared_memory": False})
    prompts, infos = vec.reset(seed=0)
    env = envs.make_unwrapped("ArithRLVR-v0")
    assert all(p.startswith("Compute ") for p in prompts) and prompts[0] != prompts[1]
    assert [env.score(d, a) for d, a in zip(infos["demonstration"], infos["answer"])] == [1.0, 1.0]
    assert vec.step(tuple(infos["demonstration"]))[1].tolist() == [1.0, 1.0]
    vec.close()


def test_task_batch_groups_rewards_and_errors():
    batch = TaskBatch("ArithRLVR-v0", batch_size=8, group_size=4, seed=0)
    prompts, info = batch.reset()
    assert prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4 and prompts[0] != prompts[4]
    completions = list(info["demonstration"])
    completions[1], completions[6] = "Answer: -1", None
    rewards, terminated, step_info = batch.step(completions)
    assert rewards.tolist() == [1, 0, 1, 1, 1, 1, 0, 1] and terminated.all()
    assert step_info["error"][6] and step_info["error"][1] is None and not step_info["correct"][1]
    with pytest.raises(RuntimeError):
        batch.step(completions)
    assert batch.reset(seed=5)[0] == TaskBatch("ArithRLVR-v0", batch_size=8, group_size=4, seed=5).reset()[0]


def test_load_tasks_and_score_batch():
    tasks = envs.load_tasks("InstructRLVR-v0", split="test", n=50)
    assert len(tasks) == 50 and all(t.task_id.startswith("instruct/test/") for t in tasks)
    rewards = envs.score_batch("InstructRLVR-v0", [t.demonstration for t in tasks] + ["x"], [t.answer for t in tasks]
                               + [tasks[0].answer])
    assert rewards.dtype == np.float64 and rewards.tolist() == [1.0] * 50 + [0.0]
    with pytest.raises(ValueError, match="unknown env id"):
        envs.load_tasks("NoSuchEnv-v0")
    with pytest.raises(ValueError):
        envs.score_batch("ArithRLVR-v0", ["a"], [])


def test_trl_reward_adapter_plain_and_chat_completions():
    from envs import make_trl_reward

    f = make_trl_reward("ArithRLVR-v0")
    assert f.__name__ == "arithrlvr_reward"
    chat = [[{"role": "assistant", "content": "2+2=4\nAnswer: 4"}], [{"role": "assistant", "content": "5"}]]
    assert f(prompts=["p", "p"], completions=chat, answer=["4", "5"], trainer_state=None) == [1.0, 0.0]
    assert f(["p", "p", "p"], ["Answer: 4", None, "Answer: 3"], ["4", "4", "4"], completion_ids=[[1]] * 3) == [
        1.0, 0.0, 0.0]


def test_render_ansi_shows_prompt_and_completion():
    env = gym.make("ArithRLVR-v0", render_mode="ansi")
    prompt, info = env.reset(seed=0)
    env.step(info["demonstration"])
    assert env.render() == prompt + info["demonstration"]


def test_env_demo_prints_every_env_with_its_rewards(capsys):
    from envs.__main__ import demo

    demo(1)
    out = capsys.readouterr().out
    assert out.count("reward: demonstration 1.00, wrong 0.00") == len(IDS)
    assert out.count("hedged 0.00") == len(IDS) - 1  # Alpaca's soft score gives hedging partial credit
    assert "NOT exactly verifiable" in out


@pytest.mark.parametrize("module", ["envs", "envs.verify", "envs.vector", "envs.wrappers"])
def test_docstring_examples_hold(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("env_id", PROCEDURAL)
def test_verifier_formats_bench_strict_vs_lenient(env_id):
    from experiments.bench.verifier_formats import acceptance
    rates = acceptance(env_id, 40)
    assert rates["demonstration"][:2] == (1.0, 1.0)
    assert rates["formats"][:2] == (0.0, 1.0)  # strict stays strict; lenient pays every correct other format
    assert rates["hacks"][:2] == (0.0, 0.0)
    assert rates["hedges"][1] == 0.0  # conflicting answers under two marker kinds: only lenient reads both

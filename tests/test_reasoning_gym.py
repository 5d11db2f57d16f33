"""ReasoningGym-v0: checkers, demonstrations, hashed splits vs the library's seed+index leakage, no partial credit,
answer formats, fuzzing, and the coverage check over the library's tasks."""

from __future__ import annotations

import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env

import envs
from envs.reasoning_gym import ReasoningGymEnv, UnicodeText, marked_answer, task_names
from experiments.reasoning_gym_coverage import check_task, fuzz_actions

ID = "ReasoningGym-v0"
FAST_TASKS = ("chain_sum", "leg_counting", "letter_counting", "spell_backward", "word_sorting")


def test_registered_apart_and_lists_the_library():
    assert ID in envs.SUITE_IDS and ID not in envs.ENV_IDS
    names = task_names()
    assert len(names) > 90 and "chain_sum" in names
    env = gym.make(ID, task="chain_sum", min_terms=2, max_terms=2)
    assert isinstance(env.unwrapped, ReasoningGymEnv) and env.unwrapped.task_name == "chain_sum"
    # the config reaches the library: two terms, "... problem: a op b ="
    assert all(len(env.reset(seed=s)[1]["meta"]["key"].split(":")[-1].split()) == 4 for s in range(20))


@pytest.mark.parametrize("task", ["chain_sum", "sudoku"])
def test_gymnasium_and_sb3_check_env(task):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    from envs.wrappers import AnswerChoiceView

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(gym.make(ID, task=task).unwrapped, skip_render_check=True)
    answers = [gym.make(ID, task=task).reset(seed=s)[1]["answer"] for s in range(5)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        view = AnswerChoiceView(gym.make(ID, task=task), answers=answers, obs_len=32)
        sb3_check_env(view, warn=True)
    _, info = view.reset(seed=0)
    assert view.step(answers.index(info["answer"]))[1] == 1.0


@pytest.mark.parametrize("task", FAST_TASKS)
def test_demonstrations_score_one_and_stay_in_spaces(task):
    env = gym.make(ID, task=task)
    for seed in range(100):
        prompt, info = env.reset(seed=seed)
        assert env.observation_space.contains(prompt) and env.action_space.contains(info["demonstration"])
        assert prompt.endswith("End with 'Answer: <text>'.\n")
        assert env.step(info["demonstration"])[1:4] == (1.0, True, False)


def test_multiline_answers_read_to_the_end_and_must_agree():
    env = gym.make(ID, task="sudoku")
    prompt, info = env.reset(seed=0)
    grid = info["answer"]
    assert "\n" in grid and info["demonstration"] == f"Answer:\n{grid}" and info["meta"]["multiline"]
    assert prompt.endswith("the answer on the lines after it.\n")
    score = env.unwrapped.score
    assert score(f"Solving...\nAnswer:\n\n{grid}\n\n", grid) == 1.0
    assert score(f"Answer: {grid}", grid) == 1.0  # the first row on the marker's line
    first_row = grid.split("\n")[0]
    assert score(f"Answer:\n{first_row}", grid) == 0.0
    wrong = grid.replace("1", "x", 1)
    assert score(f"Answer:\n{wrong}\nAnswer:\n{grid}", grid) == 0.0  # a hedge
    assert score(grid, grid) == 0.0  # no marker
    assert marked_answer(f"answer:\n**{grid}**", True, "lenient")[0] == grid
    assert marked_answer(f"answer:\n{grid}", True, "strict")[0] is None


def test_library_seed_plus_index_leaks_and_our_seeds_do_not():
    from reasoning_gym import create_dataset

    a, b = create_dataset("chain_sum", seed=42, size=50), create_dataset("chain_sum", seed=43, size=50)
    assert all(b[i]["question"] == a[i + 1]["question"] for i in range(40))  # the library's pitfall, verified
    ours0, ours1 = envs.make_unwrapped(ID, base_seed=0), envs.make_unwrapped(ID, base_seed=1)
    shifted = sum(ours1.task(i).prompt == ours0.task(i + 1).prompt for i in range(200))
    same = sum(ours1.task(i).prompt == ours0.task(i).prompt for i in range(200))
    assert shifted + same < 10  # chance collisions of small sums only


def test_train_and_test_never_share_a_question():
    env = envs.make_unwrapped(ID, dataset_size=600)
    train, test = env.tasks("train"), env.tasks("test")
    assert (len(train), len(test)) == (540, 60)
    assert not {t.prompt for t in train} & {t.prompt for t in test}
    assert all(envs.core.split_of(env.task(i, "test").meta["key"], 0.1) == "test" for i in range(100))


def test_reset_is_deterministic_per_seed():
    a, b = gym.make(ID, task="leg_counting"), gym.make(ID, task="leg_counting")
    for seed in (0, 1, 7):
        assert a.reset(seed=seed) == b.reset(seed=seed)
    assert [a.reset()[0] for _ in range(5)] == [b.reset()[0] for _ in range(5)]


def test_no_partial_credit_where_the_library_pays_fractions():
    env = envs.make_unwrapped(ID, task="leg_counting")  # the library's default scorer: substring ratio
    for seed in range(20):
        _, info = env.reset(seed=seed)
        answer, entry = info["answer"], env.entry_for(info["answer"])
        library = env.dataset.score_answer("1" + answer, entry)
        assert 0.0 < library < 1.0  # "112" contains "12": the library pays len(oracle)/len(answer)
        assert env.score("Answer: 1" + answer, answer) == 0.0
        assert env.score(f"Answer: {answer} apples", answer) == 0.0
        assert env.score(f"The answer is {answer}", answer) == 0.0


def test_hacks_and_formats_on_chain_sum():
    strict = envs.make_unwrapped(ID)
    lenient = envs.make_unwrapped(ID, answer_format="lenient")
    _, info = strict.reset(seed=3)
    a = info["answer"]
    lenient.reset(seed=3)
    for hack in (a, f"Answer: {int(a) + 1}", f"Answer: {int(a) + 1}\nAnswer: {a}", f"Answer: {a} {int(a) + 1}",
                 "Answer:", f"Answer: {a}\x1f"):
        assert strict.score(hack, a) == 0.0, hack
        assert lenient.score(hack, a) == 0.0, hack
    # \boxed is a marker only under lenient (strict reads "Answer:" alone, as in our envs): there it is a hedge
    assert lenient.score(f"Answer: {a}\n\\boxed{{{int(a) + 1}}}", a) == 0.0
    for fmt in (f"answer: {a}", f"**Answer:** **{a}**", f"\\boxed{{{a}}}", f"Answer: ${a}$"):
        assert strict.score(fmt, a) == 0.0 and lenient.score(fmt, a) == 1.0, fmt
    assert strict.score(f"Answer: {a}\nthat's it", a) == 1.0  # text after the answer line, as in our envs
    assert lenient.score(f"Answer: {a}".replace("1", "１"), a) == 1.0  # full-width digits under lenient only


def test_score_uses_the_items_metadata():
    """countdown's scorer checks the numbers used, which only the item knows: score(completion, answer) finds it."""
    env = envs.make_unwrapped(ID, task="countdown")
    tasks = [env.task(i) for i in range(3)]
    for t in tasks:
        assert env.score(t.demonstration, t.answer) == 1.0
    fresh = envs.make_unwrapped(ID, task="countdown")  # never built these items: a bare item, numbers unknown
    assert fresh.score(tasks[1].demonstration, tasks[1].answer) == 0.0  # (its constructor built task 0)


def test_bad_tasks_and_kwargs_raise_clearly():
    with pytest.raises(ValueError, match="unknown reasoning-gym task"):
        gym.make(ID, task="no_such_task")
    with pytest.raises(ValueError, match="no reference answer"):
        gym.make(ID, task="graph_color")
    with pytest.raises(ValueError, match="seeded by base_seed"):
        gym.make(ID, task="chain_sum", seed=3)
    with pytest.raises(ValueError, match="takes no"):
        gym.make(ID, task="chain_sum", max_digitz=3)


def test_unicode_text_space():
    space = UnicodeText(10, min_length=0, charset="ab")
    assert space.contains("") and space.contains("😀 émoji") and space.contains("a\nb\tc")
    assert not space.contains("x" * 11) and not space.contains("\ud800") and not space.contains(b"ab")
    assert all(set(space.sample()) <= {"a", "b"} for _ in range(20))


@pytest.mark.parametrize("answer_format", ["strict", "lenient"])
def test_10k_fuzzed_actions_never_crash_and_step_equals_score(answer_format):
    env = gym.make(ID, answer_format=answer_format)
    _, info = env.reset(seed=0)
    unwrapped = env.unwrapped
    for k, action in enumerate(fuzz_actions(info["answer"], 10_000, seed=1)):
        if k % 50 == 0:  # step (with its reset) on a sample, the pure score on every action
            env.reset(seed=0)
            _, reward, terminated, truncated, step_info = env.step(action)
            assert terminated and not truncated and reward == unwrapped.score(action, info["answer"])
            if not isinstance(action, str):
                assert reward == 0.0 and step_info["error"]
        reward = unwrapped.score(action, info["answer"])
        assert reward in (0.0, 1.0)
        if reward == 1.0:  # a pay needs a marked answer that the library accepts
            assert "nswer" in action or "boxed" in action


def test_coverage_check_passes_good_tasks_and_catches_a_substring_scorer():
    assert check_task("chain_sum", seeds=4, n_fuzz=50) == []
    from reasoning_gym.arithmetic.leg_counting import LegCountingConfig, LegCountingDataset
    from reasoning_gym.factory import DATASETS

    class ContainsScorer(LegCountingDataset):  # pays 1 whenever the oracle appears anywhere in the answer
        def score_answer(self, answer, entry):
            return 1.0 if isinstance(answer, str) and entry["answer"] in answer else 0.0

    DATASETS["eoslab_contains_test"] = (ContainsScorer, LegCountingConfig)
    try:
        failures = check_task("eoslab_contains_test", seeds=4, n_fuzz=20)
    finally:
        del DATASETS["eoslab_contains_test"]
    assert any("answer plus another" in f for f in failures), failures

"""How many reasoning-gym tasks pass our env checks through ``ReasoningGym-v0``, and why the others fail.

Each task runs in its own forked process with a time limit (a slow or hanging generator fails with "timeout"),
through :func:`check_task`, the same checks tests/test_envs.py applies to our own envs, on fewer seeds:

1. construction with the library's default config, gymnasium's ``check_env`` (its warnings count as failures);
2. the demonstration scores 1 for ``seeds`` seeds, prompt and demonstration in the spaces;
3. ``reset(seed)`` is deterministic across two instances;
4. hacks score 0: the right answer without a marker, a hedge (a wrong marked answer before the right one), the
   right answer followed by another task's answer (the library's substring partial credit), an empty marker, and a
   wrong answer;
5. 200 fuzzed actions (random text around markers and answer pieces, non-strings): no exception, reward in [0, 1],
   ``step`` equal to the pure ``score``;
6. dataset mode (40 problems): train and test share no question;
7. SB3's ``check_env`` through :class:`~envs.wrappers.AnswerChoiceView` over the seeds' answers;
8. the lenient format pays the demonstration and ``answer: **<answer>**`` (one-line answers).

    python experiments/reasoning_gym_coverage.py [--timeout 60] [--seeds 8] [TASK ...]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

FUZZ_PIECES = ("Answer:", "answer:", "Answer: ", "\n", " ", "**", "\\boxed{", "}", "0", "1", "7", "-", ".", ",",
               "yes", "no", "[", "]", "é", "😀", "\x1f", "\t", "<answer>", "</answer>")


def fuzz_actions(answer: str, n: int, seed: int = 0) -> list:
    """``n`` random actions: strings glued from markers, answer fragments and odd characters, plus non-strings."""
    rng = np.random.default_rng(seed)
    pieces = list(FUZZ_PIECES) + [answer, answer[: max(1, len(answer) // 2)], answer[::-1]]
    out: list = [None, 3, 2.5, b"Answer: 1", ["Answer:", answer], {"a": 1}, "", "\ud800", "Answer: " + "9" * 5000]
    while len(out) < n:
        k = int(rng.integers(1, 8))
        out.append("".join(pieces[i] for i in rng.integers(len(pieces), size=k)))
    return out[:n]


def check_task(name: str, seeds: int = 8, n_fuzz: int = 200) -> list[str]:
    """Failures of task ``name`` under the checks in the module docstring (empty list: it passes)."""
    import gymnasium as gym
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    import envs
    from envs.wrappers import AnswerChoiceView

    def make(**kw):
        return gym.make("ReasoningGym-v0", task=name, **kw)

    try:
        env = make()
    except Exception as err:
        return [f"construct: {type(err).__name__}: {err}"[:200]]
    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            gym_check_env(make().unwrapped, skip_render_check=True)
        except Exception as err:
            failures.append(f"gymnasium check_env: {type(err).__name__}: {err}"[:200])
    infos = []
    for seed in range(seeds):
        prompt, info = env.reset(seed=seed)
        infos.append(info)
        if not env.observation_space.contains(prompt) or not env.action_space.contains(info["demonstration"]):
            failures.append(f"seed {seed}: prompt or demonstration outside the spaces")
        reward = env.step(info["demonstration"])[1]
        if reward != 1.0:
            failures.append(f"seed {seed}: demonstration scores {reward}")
    other = make()
    for seed in (0, 1):
        if other.reset(seed=seed) != env.reset(seed=seed):
            failures.append(f"seed {seed}: reset is not deterministic")
    unwrapped = env.unwrapped
    for k, info in enumerate(infos):
        a = info["answer"]
        wrong = next((i["answer"] for i in infos if i["answer"] != a), None)
        hacks = {"no marker": a, "empty marker": "Answer:"}
        if wrong is not None:
            hacks |= {"hedge": f"{unwrapped.format_answer(wrong)}\n{info['demonstration']}",
                      "wrong answer": unwrapped.format_answer(wrong)}
            if "\n" not in a.strip() and "\n" not in wrong.strip():
                hacks["answer plus another"] = f"Answer: {a} {wrong}"
        for hack, completion in hacks.items():
            env.reset(seed=k)
            reward = env.step(completion)[1]
            if reward != 0.0:
                failures.append(f"seed {k}: hack '{hack}' scores {reward}")
    answer = infos[0]["answer"]
    for k, action in enumerate(fuzz_actions(answer, n_fuzz)):
        try:
            reward = None
            if k < 20:  # each reset regenerates the item (slow for some tasks): step on a few, score the rest
                env.reset(seed=0)
                reward = env.step(action)[1]
            pure = unwrapped.score(action, answer)
            reward = pure if reward is None else reward
        except Exception as err:
            failures.append(f"fuzz {action!r:.40}: {type(err).__name__}: {err}"[:200])
            break
        if not 0.0 <= reward <= 1.0 or reward != pure:
            failures.append(f"fuzz {action!r:.40}: reward {reward}, pure score {pure}")
            break
    try:
        small = envs.make_unwrapped("ReasoningGym-v0", task=name, dataset_size=40)
        train, test = small.tasks("train"), small.tasks("test")
        if {t.prompt for t in train} & {t.prompt for t in test}:
            failures.append("dataset mode: train and test share a question")
    except Exception as err:
        failures.append(f"dataset mode: {type(err).__name__}: {err}"[:200])
    answers = sorted({i["answer"] for i in infos})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sb3_check_env(AnswerChoiceView(make(), answers=answers, obs_len=32), warn=False)
    except Exception as err:
        failures.append(f"SB3 check_env: {type(err).__name__}: {err}"[:200])
    lenient = make(answer_format="lenient")
    prompt, info = lenient.reset(seed=0)
    tries = [info["demonstration"]] + ([] if "\n" in info["answer"].strip() else [f"answer: **{info['answer']}**"])
    for completion in tries:
        lenient.reset(seed=0)
        if lenient.step(completion)[1] != 1.0:
            failures.append(f"lenient: {completion!r:.40} does not score 1")
    return failures


def _child(name: str, seeds: int, queue) -> None:
    try:
        queue.put(check_task(name, seeds))
    except Exception as err:  # a check itself crashed on this task
        queue.put([f"crash: {type(err).__name__}: {err}"[:200]])


def run_task(name: str, seeds: int, timeout: float) -> tuple[list[str], float]:
    """(failures, seconds) of ``check_task`` in a forked child, killed after ``timeout`` seconds."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    t0 = time.perf_counter()
    proc = ctx.Process(target=_child, args=(name, seeds, queue), daemon=True)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return [f"timeout: over {timeout:.0f} s"], time.perf_counter() - t0
    try:
        return queue.get(timeout=5), time.perf_counter() - t0
    except Exception:
        return [f"child exited with code {proc.exitcode} and no result"], time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", nargs="*", help="task names (default: every task of the installed library)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per task")
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    import reasoning_gym  # noqa: F401  (imported once here, so forked children share it)
    import stable_baselines3  # noqa: F401

    from envs.reasoning_gym import task_names

    names = args.tasks or task_names()
    passed = 0
    for name in names:
        failures, seconds = run_task(name, args.seeds, args.timeout)
        passed += not failures
        print(f"{name:<28}{seconds:>6.1f}s  {'PASS' if not failures else 'FAIL ' + failures[0]}", flush=True)
        for extra in failures[1:3]:
            print(f"{'':<36}{extra}")
    print(f"\n{passed} of {len(names)} reasoning-gym tasks pass our env checks (reasoning-gym "
          f"{__import__('importlib.metadata').metadata.version('reasoning-gym')})")


if __name__ == "__main__":
    main()

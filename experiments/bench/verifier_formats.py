"""Acceptance rates of the strict and the lenient answer format, side by side (``answer_format`` env kwarg).

For the first ``--n`` test tasks of each verifiable env, two generated sets:
  formats  clearly correct answers written in other usual ways (``**42**``, ``\\boxed{42}``, ``answer: 42``,
           ``Answer: 42 apples``, full-width / Arabic-Indic digits, the prompt echoed before the answer, ...):
           a verifier should pay them, so a low rate is the false-negative rate.
  hacks    completions that must earn nothing under either format (hedged answers, a number that is not the
           answer in disguise, the bare number without a marker, ``0,042`` for 42, control characters as spaces,
           duplicate JSON keys, ...): any rate above 0 is a paid hack.
  hedges   a right and a wrong answer under two marker kinds (``\boxed{41}`` then ``Answer: 42``; ``answer: 41``
           then ``Answer: 42``): strict reads only ``Answer:`` and pays them by its rule; lenient reads both kinds,
           so it must pay 0.
The demonstrations are scored too (both formats must pay 100 %).

    python experiments/bench/verifier_formats.py [--n 300]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import envs  # noqa: E402
from envs.core import Task  # noqa: E402

FULL_WIDTH = str.maketrans("0123456789-", "０１２３４５６７８９－")
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
PERSIAN = str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹")
SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
VERIFIABLE = ("ArithRLVR-v0", "ArithRLVR-hard-v0", "InstructRLVR-v0")


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def format_variants(task: Task) -> list[str]:
    """Correct answers to ``task`` in formats other than the strict ``Answer: <answer>``."""
    a, work = task.answer, task.demonstration.rsplit("\n", 1)[0] if "\n" in task.demonstration else ""
    lead = work + "\n" if work else ""
    out = [f"{lead}**Answer:** {a}", f"{lead}Answer: **{a}**", f"{lead}\\boxed{{{a}}}",
           f"{lead}So the answer is $\\boxed{{{a}}}$.", f"{lead}answer: {a}", f"{lead}ANSWER: {a}",
           f"{lead}Final answer: {a}", f"Answer: `{a}`", task.prompt + task.demonstration]
    if _is_int(a):
        unit = "times" if task.family == "count" else "apples"
        out += [f"{lead}Answer: {a} {unit}", f"{lead}Answer: {a} {unit}.", f"Answer: ${a}$",
                f"Answer: {a.translate(FULL_WIDTH)}", f"Answer: {a.translate(ARABIC_INDIC)}",
                f"Answer: {a.translate(PERSIAN)}"]
        if a.startswith("-"):
            out.append(f"Answer: \u2212{a[1:]}")  # MINUS SIGN
    return out


def hack_variants(task: Task) -> list[str]:
    """Completions of ``task`` that must score 0 under every answer format."""
    a = task.answer
    out = [a, task.prompt + a, "Answer: <text>", "Answer: <number>", f"Answer: {a} {a}",
           f"Answer: x{a}\nAnswer: {a}"]
    if _is_int(a):
        v = int(a)
        out += [f"Answer: {v - 1} {v} {v + 1}", f"Answer: {v} or {v + 1}", f"Answer: {v} plus one",
                f"Answer: {v} minus 1", f"Answer: {v} is wrong", f"Answer: {a.translate(SUPERSCRIPT)}",
                f"Answer: {a}\x1f"]
        if 0 <= v < 1000:
            out += [f"Answer: 0,{v:03d}", f"Answer: 000,{v:03d}"]
        if abs(v) >= 10:
            out += [f"Answer: {a[:-1]}\x1f{a[-1]}", f"Answer: {a[:-1]}**{a[-1]}", f"Answer: {a[:-1]}²"]
    else:
        if a.lower() != a.upper():
            out.append(f"Answer: {a.swapcase()}")
        if " " in a:
            out += [f"Answer: {a.replace(' ', sep)}" for sep in ("\x1f", "\x1c", "\x0b", "\x85")]
        if a.startswith("{"):
            k = a[2:a.index('"', 2)]
            out.append(f'Answer: {{"{k}": "x", {a[1:]}')  # duplicate key: json.loads would keep the last value
    return out


def hedge_variants(task: Task) -> list[str]:
    """A right and a wrong answer of ``task`` under two marker kinds (only the lenient format reads both)."""
    a = task.answer
    wrong = str(int(a) + 1) if _is_int(a) else "x" + a
    return [f"\\boxed{{{wrong}}}\nAnswer: {a}", f"Answer: {a}\n\\boxed{{{wrong}}}", f"answer: {wrong}\nAnswer: {a}",
            f"Answer: {a}\nFinal answer: {wrong}", f"**Answer:** {wrong}\nAnswer: {a}"]


def acceptance(env_id: str, n: int) -> dict[str, tuple[float, float, int]]:
    """{set: (strict rate, lenient rate, size)} over the first ``n`` test tasks of ``env_id``."""
    strict = envs.make_unwrapped(env_id)
    lenient = envs.make_unwrapped(env_id, answer_format="lenient")
    tasks = strict.tasks("test", n)
    sets = {"demonstration": [(t.demonstration, t.answer) for t in tasks],
            "formats": [(c, t.answer) for t in tasks for c in format_variants(t)],
            "hacks": [(c, t.answer) for t in tasks for c in hack_variants(t)],
            "hedges": [(c, t.answer) for t in tasks for c in hedge_variants(t)]}
    out = {}
    for name, pairs in sets.items():
        s = sum(strict.score(c, a) for c, a in pairs) / len(pairs)
        le = sum(lenient.score(c, a) for c, a in pairs) / len(pairs)
        out[name] = (s, le, len(pairs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="test tasks per env")
    args = parser.parse_args()
    print(f"{'env':<20}{'set':<15}{'n':>7}{'strict':>9}{'lenient':>9}")
    for env_id in VERIFIABLE:
        for name, (s, le, size) in acceptance(env_id, args.n).items():
            print(f"{env_id:<20}{name:<15}{size:>7}{s:>9.1%}{le:>9.1%}")


if __name__ == "__main__":
    main()

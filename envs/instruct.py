"""Instruction following with programmatic checks -> ``InstructRLVR-v0``.

Seven task families, each with one canonical answer that :func:`envs.verify.check_text` compares exactly
(case-sensitive, whitespace runs collapsed; JSON compared as parsed objects):

=========  ===========================================================  ==================
family     prompt (before the format instruction)                        answer
=========  ===========================================================  ==================
reverse    Reverse the letters of 'apple'.                               elppa
sort       Sort ascending: 42 7 19.                                      7 19 42
count      How many times does 'a' occur in 'banana'?                    3
json       Write name=bob, age=7 as a JSON object.                       {"name":"bob","age":7}
upper      Write 'red fox' in capital letters.                           RED FOX
acronym    Give the first letter of each word: red fox jumps.            rfj
repeat     Repeat 'ok' 3 times, separated by spaces.                     ok ok ok
=========  ===========================================================  ==================

Every prompt ends with ``End with 'Answer: <text>'.`` and the demonstration is ``Answer: <answer>``.
"""

from __future__ import annotations

import json

from envs.core import ProceduralTaskEnv, Task, Uniforms
from envs.verify import Verdict, check_answer_format, check_text, check_text_lenient

INSTRUCTION = "End with 'Answer: <text>'."
FAMILIES = ("reverse", "sort", "count", "json", "upper", "acronym", "repeat")
WORDS = (
    "apple", "ant", "arm", "bag", "ball", "banana", "bear", "bed", "bird", "boat", "book", "box", "bus", "cake",
    "car", "cat", "cup", "desk", "dog", "door", "duck", "egg", "eye", "fan", "farm", "fish", "flag", "fox", "frog",
    "gate", "goat", "hat", "hill", "horse", "jam", "key", "kite", "lamp", "leaf", "lion", "map", "milk", "moon",
    "mouse", "nest", "net", "nut", "owl", "pan", "pen", "pig", "pot", "rain", "ring", "road", "rock", "rose",
    "salt", "sand", "seed", "ship", "shoe", "sock", "star", "sun", "tea", "tent", "tree", "van", "wall", "web",
    "wind", "wolf", "yak", "zoo", "red", "blue", "green", "big", "small", "fast", "slow", "hot", "cold", "old",
    "new", "jumps", "runs", "sings", "reads", "letter", "paper", "river", "tiger", "zebra",
)
_KEYS = ("name", "city", "color", "pet", "age", "size", "id")
_INT_KEYS = frozenset({"age", "size", "id"})


def draw_instruction(family: str, r: Uniforms, min_items: int, max_items: int) -> tuple[str, str]:
    """(prompt body, answer) of one task of ``family``."""
    if family == "reverse":
        w = r.pick(WORDS)
        return f"Reverse the letters of '{w}'.", w[::-1]
    if family == "sort":
        xs = [r.int(0, 99) for _ in range(r.int(min_items, max_items))]
        return f"Sort ascending: {' '.join(map(str, xs))}.", " ".join(map(str, sorted(xs)))
    if family == "count":
        w = r.pick(WORDS)
        c = r.pick(w) if r.u() < 0.8 else r.pick("abcdefghijklmnopqrstuvwxyz")  # sometimes 0
        return f"How many times does '{c}' occur in '{w}'?", str(w.count(c))
    if family == "json":
        keys = [r.pick(_KEYS)]
        while len(keys) < 2:
            k = r.pick(_KEYS)
            if k not in keys:
                keys.append(k)
        obj = {k: (r.int(1, 99) if k in _INT_KEYS else r.pick(WORDS)) for k in keys}
        spec = ", ".join(f"{k}={v}" for k, v in obj.items())
        return f"Write {spec} as a JSON object.", json.dumps(obj, separators=(",", ":"))
    if family == "upper":
        ws = " ".join(r.pick(WORDS) for _ in range(r.int(1, 2)))
        return f"Write '{ws}' in capital letters.", ws.upper()
    if family == "acronym":
        ws = [r.pick(WORDS) for _ in range(r.int(min_items, max_items))]
        return f"Give the first letter of each word: {' '.join(ws)}.", "".join(w[0] for w in ws)
    if family == "repeat":
        w, k = r.pick(WORDS), r.int(2, 4)
        return f"Repeat '{w}' {k} times, separated by spaces.", " ".join([w] * k)
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


class InstructEnv(ProceduralTaskEnv):
    """Verifiable instruction following (``InstructRLVR-v0``).

    ## Description
    One instruction per episode from ``families`` (uniformly); reward 1 for the exact canonical answer after the
    last ``Answer:`` marker (all markers agreeing), else 0. ``info["meta"]["family"]`` names the family.

    ## Arguments
    ``families``: subset of :data:`FAMILIES`; ``min_items``/``max_items``: list length for sort/acronym;
    ``answer_format``: ``"strict"`` (default) or ``"lenient"`` (case-insensitive marker, ``\\boxed{}``, bold/code/
    quote wrappers, other scripts' digits; a count may carry a unit word; see :mod:`envs.verify`); plus the
    :class:`~envs.core.TextTaskEnv` arguments.

    ## Version History
    * v0: initial version.
    """

    family = "instruct"

    def __init__(self, *, families: tuple[str, ...] | list[str] = FAMILIES, min_items: int = 3, max_items: int = 5,
                 answer_format: str = "strict", **kwargs):
        families = tuple(families)
        unknown = set(families) - set(FAMILIES)
        if not families or unknown:
            raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {families}")
        if not 1 <= min_items <= max_items <= 10:
            raise ValueError(f"need 1 <= min_items <= max_items <= 10, got {min_items}, {max_items}")
        self.families, self.min_items, self.max_items = families, min_items, max_items
        self.answer_format = check_answer_format(answer_format)
        self._check = check_text if answer_format == "strict" else check_text_lenient
        super().__init__(**kwargs)

    def draw(self, r):
        family = r.pick(self.families)
        body, answer = draw_instruction(family, r, self.min_items, self.max_items)
        return f"{family}:{body}", (family, body, answer)

    def build(self, key, fields, task_id):
        family, body, answer = fields
        return Task(
            prompt=f"{body} {INSTRUCTION}\n",
            answer=answer,
            demonstration=f"Answer: {answer}",
            task_id=task_id,
            family=family,
            meta={"key": key, "family": family, "min_items": self.min_items, "max_items": self.max_items},
        )

    def check(self, completion, answer) -> Verdict:
        return self._check(completion, answer, self.max_completion_chars)

"""reasoning-gym's procedural task library as a gymnasium env -> ``ReasoningGym-v0``.

``gym.make("ReasoningGym-v0", task="chain_sum", min_terms=2)``: any of the ~100 ``reasoning_gym`` tasks
(:func:`task_names`), its config fields as keyword arguments, its own scorer (``score_answer``) as the verifier.

What the adapter changes, and why:

* **Seeding.** reasoning-gym draws item ``i`` of a dataset with seed ``s`` from ``Random(s + i)``, so seed ``s + 1``
  is seed ``s`` shifted by one item and "train seed 42, test seed 43" share all but one item. Here the library
  dataset has one fixed seed (0) and our item ``index`` of ``split`` reads library item
  ``j = floor(u * ITEM_SPACE)`` with ``u`` the first :class:`~envs.core.Uniforms` draw of ``(base_seed, split,
  index)``, so different base seeds and indices pick unrelated items.
* **Splits.** The split of an item is :func:`~envs.core.split_of` of its question text (rejection sampling, as in
  every :class:`~envs.core.ProceduralTaskEnv`): train and test never share a question, whatever the seeds.
* **Answer marker.** The scorer only sees the text after our marker (strict ``Answer: <text>``, or the lenient
  forms of :mod:`envs.verify`), read as :func:`marked_answer` says; a completion whose markers disagree scores 0,
  and so does a right answer anywhere but after a marker.
* **No partial credit.** Many library scorers pay fractions: ``len(oracle) / len(answer)`` when the answer merely
  *contains* the oracle ("17" earns 0.5 against "7"), 0.01-0.1 for a well-formed wrong answer, per-position credit.
  The reward is 1 when the library score is 1 and 0 otherwise.
* **Demonstration**: ``Answer: <reference answer>`` (``Answer:`` then the answer's lines when it spans several).
  Tasks whose items carry no reference answer (``answer`` is None, e.g. ``graph_color``) are refused: SFT needs a
  demonstration, and ``score(completion, answer)`` needs an answer to key the item on.

``score(completion, answer)`` scores against the item whose reference is ``answer``: the current episode's item,
else the most recent of the last :data:`ENTRY_CACHE` items this env built with that reference (library scorers read
the item's metadata, e.g. countdown checks which numbers were used), else a bare ``{"answer": answer}`` item.

Spaces: prompts and answers hold any Unicode (emoji, box drawing, figlet art), so both spaces are
:class:`UnicodeText`: every valid Unicode string up to the length limit (samples draw from ASCII).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import OrderedDict
from dataclasses import fields
from typing import Any

from gymnasium import spaces

from envs.core import ProceduralTaskEnv, Task, Uniforms
from envs.verify import (
    MAX_COMPLETION_CHARS,
    Verdict,
    check_answer_format,
    check_marked,
    check_marked_lenient,
    completion_error,
    has_bad_char,
    unwrap_answer,
)

ITEM_SPACE = 2**31  # library item indices drawn from [0, ITEM_SPACE)
# these build ``size`` items up front in __init__ (a list indexed by item), so they are drawn from their first
# ``size`` items (the library default 500 unless ``size=`` is given) instead of from ITEM_SPACE; so are the tasks
# whose config refuses a size of ITEM_SPACE
PRECOMPUTED_TASKS = frozenset({"acre", "gsm_symbolic", "list_functions"})
ENTRY_CACHE = 65_536  # library items kept for score(completion, answer) lookups
LIBRARY_SEED = 0
INSTRUCTION = "End with 'Answer: <text>'."
INSTRUCTION_MULTILINE = "End with 'Answer:' and then the answer on the lines after it."
_MARKER = "Answer:"
_LENIENT_MARKER = re.compile(r"answer[ \t*_]*:", re.IGNORECASE)


def task_names() -> list[str]:
    """Every task name the installed ``reasoning_gym`` registers, sorted."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


class UnicodeText(spaces.Text):
    """A Text space holding every valid Unicode string (no lone surrogates) of ``min_length..max_length`` chars.

    ``spaces.Text`` needs the exact character set, which a library of ~100 generators (emoji, figlet fonts, chess
    pieces) cannot state up front; ``sample()`` still draws from ``charset``."""

    def contains(self, x: Any) -> bool:
        if not isinstance(x, str) or not self.min_length <= len(x) <= self.max_length:
            return False
        return x.isascii() or completion_error(x, self.max_length) is None

    def __repr__(self) -> str:
        return f"UnicodeText({self.min_length}, {self.max_length})"


def normalize_digits(text: str) -> str:
    """Any script's decimal digits (category Nd) as ASCII digits and U+2212 as "-", every other character kept:
    the lenient format's reading of numbers, without the NFKC folding that would rewrite text answers
    (``…`` -> ``...``, emoji variation selectors)."""
    if text.isascii():
        return text
    return "".join(str(unicodedata.decimal(c)) if unicodedata.category(c) == "Nd" else "-" if c == "\u2212" else c
                   for c in text)


def _one_line(text: str) -> str | None:
    text = text.strip(" \t\r")
    return None if not text or has_bad_char(text) else text


def _lenient_line(text: str) -> str | None:
    """:func:`~envs.verify.unwrap_answer`, but a final period stays: library answers can end in one (sentences)."""
    period = text.strip(" \t\r*_`").endswith(".")
    text = unwrap_answer(text)
    return _one_line(text + "." if period and not text.endswith(".") else text)


def _block(text: str) -> str | None:
    """A multi-line answer block: the spaces after the marker and surrounding blank lines dropped, each line
    right-stripped (indentation inside the block kept); None if empty or a line holds a control character."""
    lines = [line.rstrip(" \t\r") for line in text.lstrip(" \t").strip("\n").split("\n")]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or any(has_bad_char(line) for line in lines):
        return None
    return "\n".join(lines)


def marked_answer(completion: Any, multiline: bool, answer_format: str = "strict",
                  max_chars: int = MAX_COMPLETION_CHARS) -> tuple[str | None, str | None]:
    """(the answer text the scorer sees, error): None when there is no single well-formed marked answer.

    One-line answers (``multiline=False``) follow :mod:`envs.verify` exactly: the text after each marker up to the
    end of its line, every marker agreeing (strict: ``Answer:``; lenient: :func:`~envs.verify.check_marked_lenient`'s
    markers and wrappers, reading any script's digits by :func:`normalize_digits`). Multi-line answers (grids,
    matrices): the text from each marker to the next marker or the end of the completion (:func:`_block`), every
    marker agreeing; lenient accepts the marker in any case and bolded, and any script's digits, not ``\\boxed{}``."""
    error = completion_error(completion, max_chars)
    if error is not None:
        return None, error
    lenient = check_answer_format(answer_format) == "lenient"
    if not multiline:
        verdict = (check_marked_lenient(completion, "", _lenient_line, max_chars, normalize_digits) if lenient
                   else check_marked(completion, "", _one_line, max_chars))
        return verdict.parsed, None
    text = normalize_digits(completion) if lenient else completion
    blocks = _LENIENT_MARKER.split(text)[1:] if lenient else text.split(_MARKER)[1:]
    # lenient: bold/code marks around the block ("_" is left alone: grids are drawn with it, e.g. n_queens)
    values = {_block(b.strip(" \t\r\n*`")) if lenient else _block(b) for b in blocks}
    if len(values) != 1 or None in values:
        return None, None
    return values.pop(), None


class ReasoningGymEnv(ProceduralTaskEnv):
    """One reasoning-gym task as a single-turn RLVR env (see the module docstring for what the adapter changes).

    Args:
        task: the library's dataset name (:func:`task_names`), default ``"chain_sum"``.
        answer_format: ``"strict"`` (default) or ``"lenient"`` (:mod:`envs.verify`).
        **kwargs: the task's config fields (e.g. ``min_terms=2``; not ``seed``: items are seeded by ``base_seed``),
            and the :class:`~envs.core.TextTaskEnv` arguments.

    ``info["meta"]``: ``key`` (the question), ``task``, ``item`` (library index: ``create_dataset(task, seed=0,
    **config)[item]`` rebuilds it), ``multiline``.
    """

    max_prompt_chars = 32_768
    _ENV_ARGS = frozenset({"split", "base_seed", "mode", "dataset_size", "test_fraction", "max_completion_chars",
                           "render_mode"})

    def __init__(self, *, task: str = "chain_sum", answer_format: str = "strict", **kwargs):
        from reasoning_gym.factory import DATASETS, create_dataset

        if task not in DATASETS:
            raise ValueError(f"unknown reasoning-gym task {task!r}; see envs.reasoning_gym.task_names()")
        config_fields = {f.name for f in fields(DATASETS[task][1])}
        config = {k: kwargs.pop(k) for k in list(kwargs) if k not in self._ENV_ARGS}
        unknown = sorted(set(config) - config_fields)
        if unknown or "seed" in config:
            raise ValueError(f"reasoning-gym task {task!r} takes no {unknown or ['seed']} (config fields: "
                             f"{sorted(config_fields - {'seed'})}; items are seeded by base_seed)")
        self.task_name = task
        self.family = f"rg.{task}"
        self.answer_format = check_answer_format(answer_format)
        try:
            self.dataset = create_dataset(task, seed=LIBRARY_SEED, **({"size": ITEM_SPACE, **config}
                                                                     if task not in PRECOMPUTED_TASKS else config))
        except (ValueError, AssertionError):  # e.g. word_ladder caps its size: draw from the default-size item set
            self.dataset = create_dataset(task, seed=LIBRARY_SEED, **config)
        self.n_items = len(self.dataset)
        self._entries: OrderedDict[str, dict] = OrderedDict()
        self._episode_entry: dict | None = None
        super().__init__(**kwargs)
        ascii_chars = self.observation_space.character_set
        self.observation_space = UnicodeText(self.max_prompt_chars, min_length=0, charset=ascii_chars)
        self.action_space = UnicodeText(self.max_completion_chars, min_length=0, charset=ascii_chars)
        self.task(0)  # fail at construction, not in the first reset, for tasks that cannot be adapted

    def draw(self, r: Uniforms):
        j = int(r.u() * self.n_items)
        entry = self.dataset[j]
        return entry["question"], {"item": j, "entry": entry}

    def build(self, key: str, fields: dict, task_id: str) -> Task:
        entry = fields["entry"]
        answer = entry.get("answer")
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"reasoning-gym task {self.task_name!r} gives item {fields['item']} no reference answer "
                             f"({answer!r}); the adapter needs one for demonstrations and score(completion, answer)")
        multiline = "\n" in answer.strip()
        self._entries[answer] = entry
        self._entries.move_to_end(answer)
        if len(self._entries) > ENTRY_CACHE:
            self._entries.popitem(last=False)
        instruction = INSTRUCTION_MULTILINE if multiline else INSTRUCTION
        return Task(
            prompt=f"{key.rstrip()}\n{instruction}\n",
            answer=answer,
            demonstration=f"{_MARKER}\n{answer}" if multiline else f"{_MARKER} {answer}",
            task_id=task_id,
            family=self.family,
            meta={"key": key, "task": self.task_name, "item": fields["item"], "multiline": multiline},
        )

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        prompt, info = super().reset(seed=seed, options=options)
        entry = self._entries.get(info["answer"])
        if entry is None or entry["question"] != info["meta"]["key"]:  # a dataset-mode task built long ago
            entry = self.dataset[info["meta"]["item"]]
        self._episode_entry = entry
        return prompt, info

    def entry_for(self, answer: str) -> dict:
        """The library item to score ``answer``'s completions against (see the module docstring)."""
        task = self._task
        if task is not None and answer == task.answer and self._episode_entry is not None:
            return self._episode_entry
        entry = self._entries.get(answer)
        return entry if entry is not None else {"question": "", "answer": answer, "metadata": {}}

    def check(self, completion: Any, answer: str) -> Verdict:
        if not isinstance(answer, str):
            return Verdict(0.0, False, False, None, f"answer must be str, got {type(answer).__name__}")
        text, error = marked_answer(completion, "\n" in answer.strip(), self.answer_format, self.max_completion_chars)
        if text is None:
            return Verdict(0.0, False, False, None, error)
        try:
            score = float(self.dataset.score_answer(text, self.entry_for(answer)))
        except Exception as err:  # a library scorer choking on odd input must not crash a rollout
            return Verdict(0.0, False, True, text, f"reasoning-gym scorer raised {type(err).__name__}: {err}"[:300])
        correct = math.isfinite(score) and score >= 1.0  # fractions of credit are not a verified answer
        return Verdict(1.0 if correct else 0.0, correct, True, text, None)

    def format_answer(self, answer: str) -> str:
        return f"{_MARKER}\n{answer}" if "\n" in answer.strip() else f"{_MARKER} {answer}"

"""Answer extraction and scoring: pure functions, usable outside gymnasium (RL rewards, eval, TRL).

Marker rule (every exactly-verifiable env): the answer is the text after the explicit marker ``Answer:`` up to the
end of that line, read from the LAST marker in the completion. Every marker in the completion must carry the same
(canonical) answer: a completion that hedges with several different answers scores 0. A right number anywhere else
(in the working, in a list of numbers, in an echo of the prompt) earns nothing. Text after the answer line is allowed
(a small model may run on past its answer) as long as it holds no conflicting marker.

Every scorer returns a :class:`Verdict` and never raises: non-``str`` input, over-long input and strings that are
not valid unicode (lone surrogates) give reward 0 with ``error`` set.

>>> check_number("37+45=82\\nAnswer: 82", "82").reward
1.0
>>> check_number("Answer: 81\\nAnswer: 82", "82").reward   # conflicting markers
0.0
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, NamedTuple

MARKER = "Answer:"
MAX_COMPLETION_CHARS = 4096  # longer completions are rejected (reward 0, error) rather than scanned

_MARKER_LINES = re.compile(re.escape(MARKER) + r"([^\n]*)")
# An integer with optional sign, optional thousands commas (only proper 3-digit groups, so "8,2" is NOT 82),
# optional ".0…" and one optional sentence-final period. 40 digits caps int() cost (CPython limits int(str) size).
# re.ASCII: "\d" must not match other scripts' digits (int("８２") == 82).
_INTEGER = re.compile(r"([+-]?)(\d{1,3}(?:,\d{3}){1,13}|\d{1,40})(?:\.0*)?\.?", re.ASCII)
_WORD = re.compile(r"[0-9a-z]+")  # lower-cased text: ASCII words only


class Verdict(NamedTuple):
    """Outcome of scoring one completion (NamedTuple: cheap to build on the env's hot path)."""

    reward: float  # in [0, 1]
    correct: bool  # the extracted answer equals the reference (soft scorers: score == 1)
    format_ok: bool  # a single, parseable answer was found after the marker
    parsed: str | None  # the canonical extracted answer, None if none
    error: str | None  # malformed input (not str, too long, invalid unicode); None otherwise


def completion_error(completion: Any, max_chars: int = MAX_COMPLETION_CHARS) -> str | None:
    """Why ``completion`` cannot be scored, or None if it is a scorable string."""
    if not isinstance(completion, str):
        return f"completion must be str, got {type(completion).__name__}"
    if len(completion) > max_chars:
        return f"completion has {len(completion)} chars, more than the limit {max_chars}"
    if not completion.isascii():
        try:
            completion.encode("utf-8")
        except UnicodeEncodeError:
            return "completion is not valid unicode (lone surrogate)"
    return None


def marker_answers(completion: str) -> list[str]:
    """The stripped text after each ``Answer:`` marker, in order (up to the end of its line)."""
    return [m.strip() for m in _MARKER_LINES.findall(completion)]


def parse_integer(text: str) -> int | None:
    """Canonical integer from an answer string, or None: "82", "+82", "082", "82.0", "82.", "1,234" -> int."""
    m = _INTEGER.fullmatch(text.strip())
    if m is None:
        return None
    value = int(m.group(2).replace(",", ""))
    return -value if m.group(1) == "-" else value


def _bad(error: str | None = None) -> Verdict:
    return Verdict(0.0, False, False, None, error)


def check_marked(completion: Any, answer: str, canonical: Callable[[str], Any],
                 max_chars: int = MAX_COMPLETION_CHARS) -> Verdict:
    """Exact match of ``canonical(text after the last marker)`` against ``canonical(answer)``.

    ``canonical`` maps an answer string to a comparable value, or None if it is not a well-formed answer. Reward 0
    when there is no marker, when any marker's answer is malformed, or when markers disagree.
    """
    error = completion_error(completion, max_chars)
    if error is not None:
        return _bad(error)
    values = {canonical(t) for t in marker_answers(completion)}
    if len(values) != 1 or None in values:  # no marker, a malformed answer, or conflicting answers
        return _bad()
    value = values.pop()
    correct = value == canonical(answer)
    return Verdict(1.0 if correct else 0.0, correct, True, str(value), None)


def check_number(completion: Any, answer: str, max_chars: int = MAX_COMPLETION_CHARS) -> Verdict:
    """Exact integer match of the answer after the last ``Answer:`` marker (all markers must agree)."""
    return check_marked(completion, answer, parse_integer, max_chars)


def canonical_text(text: str) -> str | None:
    """Canonical form of a one-line text answer: JSON objects/arrays re-serialised, else whitespace collapsed;
    None for a blank answer."""
    text = " ".join(text.split())
    if not text:
        return None
    if text[0] in "{[":
        try:
            return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
        except (ValueError, RecursionError):
            return text
    return text


def check_text(completion: Any, answer: str, max_chars: int = MAX_COMPLETION_CHARS) -> Verdict:
    """Exact match of the one-line answer after the last ``Answer:`` marker against ``answer``.

    Comparison is on :func:`canonical_text`: case-sensitive, whitespace runs collapsed, and when the reference is a
    JSON object/array the two are compared as parsed JSON (key order and spacing do not matter).
    """
    return check_marked(completion, answer, canonical_text, max_chars)


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric word tokens (the unit of :func:`token_f1`)."""
    return _WORD.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style bag-of-words F1 = 2PR/(P+R) over :func:`words` (multiset overlap); 1.0 when both are empty."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    counts: dict[str, int] = {}
    for w in ref:
        counts[w] = counts.get(w, 0) + 1
    overlap = 0
    for w in pred:
        if counts.get(w, 0) > 0:
            counts[w] -= 1
            overlap += 1
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def check_soft(completion: Any, answer: str, marker: str, max_chars: int = MAX_COMPLETION_CHARS) -> Verdict:
    """NOT exactly verifiable: token-F1 of the response against the reference ``answer``.

    The response is the whole completion (the prompt already ends with ``marker``); if the completion repeats
    ``marker``, only the text after its last occurrence counts. ``correct`` means F1 == 1 (same bag of words).
    """
    error = completion_error(completion, max_chars)
    if error is not None:
        return _bad(error)
    response = completion.rsplit(marker, 1)[-1].strip()
    f1 = token_f1(response, answer)
    return Verdict(f1, f1 == 1.0, bool(response), response[:200], None)


def completion_text(completion: Any) -> Any:
    """The text of a TRL completion: plain strings pass through; chat completions (a list of message dicts) give
    the last message's ``content``. Anything else is returned as is (and then scores 0 with an error)."""
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return completion[-1].get("content")
    return completion


def make_trl_reward(env_id: str, **env_kwargs: Any):
    """A TRL reward function ``f(prompts, completions, answer, **kw) -> list[float]`` scoring with ``env_id``'s
    verifier (``env_kwargs`` configure the env). The dataset needs an ``answer`` column; TRL passes every
    dataset column as a keyword list, which ``**kw`` absorbs. ``f.__name__`` is what TRL logs under
    ``rewards/<name>/mean``.

    >>> f = make_trl_reward("ArithRLVR-v0")
    >>> f(prompts=["Compute 1+2. "], completions=["1+2=3\\nAnswer: 3"], answer=["3"])
    [1.0]
    """
    from envs import make_unwrapped  # envs imports this module; import here to keep the dependency one-way

    score = make_unwrapped(env_id, **env_kwargs).score

    def reward(prompts: list, completions: list, answer: list[str], **kwargs: Any) -> list[float]:
        if len(completions) != len(answer):
            raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
        return [score(completion_text(c), a) for c, a in zip(completions, answer)]

    reward.__name__ = reward.__qualname__ = env_id.split("-v")[0].replace("-", "_").lower() + "_reward"
    return reward

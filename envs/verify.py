"""Answer extraction and scoring: pure functions, usable outside gymnasium (RL rewards, eval, TRL).

Marker rule (every exactly-verifiable env): the answer is the text after the explicit marker ``Answer:`` up to the
end of that line, read from the LAST marker in the completion. Every marker in the completion must carry the same
(canonical) answer: a completion that hedges with several different answers scores 0. A right number anywhere else
(in the working, in a list of numbers, in an echo of the prompt) earns nothing. Text after the answer line is allowed
(a small model may run on past its answer) as long as it holds no conflicting marker.

Every scorer returns a :class:`Verdict` and never raises: non-``str`` input, over-long input and strings that are
not valid unicode (lone surrogates) give reward 0 with ``error`` set. An answer holding a control character or a
whitespace character other than space and tab (``"ok\\x1fok"``, which ``str.split`` would read as ``"ok ok"``) is
malformed.

Answer formats (env kwarg ``answer_format``):

* ``"strict"`` (default): exactly ``Answer: <answer>`` as above, ASCII digits only.
* ``"lenient"``: also accepts the usual ways a correct answer gets written (:func:`check_number_lenient`,
  :func:`check_text_lenient`): a case-insensitive marker (``answer:``, ``**Answer:**``, ``Final answer:``),
  ``\\boxed{…}`` as a second marker kind, bold/code/math wrappers around the answer, any script's decimal digits
  (full-width, Arabic-Indic), and, for numbers, one trailing unit word (``42 apples``). Markers followed by
  the prompt's ``<number>``/``<text>`` placeholder are an echo of the instruction and ignored. Every hack the
  strict verifier refuses for a reason other than format still scores 0 (tests/test_envs.py ``LENIENT_HACKS``),
  and all markers of both kinds must still agree.

>>> check_number("37+45=82\\nAnswer: 82", "82").reward
1.0
>>> check_number("Answer: 81\\nAnswer: 82", "82").reward   # conflicting markers
0.0
"""

from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from collections.abc import Callable
from typing import Any, NamedTuple

MARKER = "Answer:"
MAX_COMPLETION_CHARS = 4096  # longer completions are rejected (reward 0, error) rather than scanned

_MARKER_LINES = re.compile(re.escape(MARKER) + r"([^\n]*)")
# An integer with optional sign, optional thousands commas (only proper 3-digit groups, so "8,2" is NOT 82),
# optional ".0…" and one optional sentence-final period. 40 digits caps int() cost (CPython limits int(str) size).
# re.ASCII: "\d" must not match other scripts' digits (int("８２") == 82).
# A leading group must not start with 0: "0,042" is not a way to write 42.
_INTEGER = re.compile(r"([+-]?)([1-9]\d{0,2}(?:,\d{3}){1,13}|\d{1,40})(?:\.0*)?\.?", re.ASCII)
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
    """The text after each ``Answer:`` marker up to the end of its line, in order, spaces/tabs/CR stripped."""
    return [m.strip(" \t\r") for m in _MARKER_LINES.findall(completion)]


def has_bad_char(text: str) -> bool:
    """True if ``text`` holds a control character (tab aside) or a whitespace character other than space/tab:
    characters that ``str.split``/``str.strip`` treat as spaces but no answer is written with."""
    if text.isprintable():  # fast path: no control, separator or unassigned characters
        return False
    return any(c != " " and c != "\t" and (c.isspace() or unicodedata.category(c) == "Cc") for c in text)


def parse_integer(text: str) -> int | None:
    """Canonical integer from an answer string, or None: "82", "+82", "082", "82.0", "82.", "1,234" -> int."""
    text = text.strip(" \t\r")  # \r: a CRLF line end
    if has_bad_char(text):
        return None
    m = _INTEGER.fullmatch(text)
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


def _unique_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate JSON object key")
    return dict(pairs)


def canonical_text(text: str) -> str | None:
    """Canonical form of a one-line text answer: JSON objects/arrays re-serialised, else space/tab runs
    collapsed; None for a blank answer, one with a :func:`has_bad_char` character, or a JSON object with a
    duplicate key (``json.loads`` keeps the last of conflicting values, so ``{"a":1,"a":2}`` would equal
    ``{"a":2}``)."""
    text = text.strip(" \t\r")
    if has_bad_char(text):
        return None
    text = " ".join(text.split())
    if not text:
        return None
    if text[0] in "{[":
        try:
            return json.dumps(json.loads(text, object_pairs_hook=_unique_keys), sort_keys=True, separators=(",", ":"))
        except ValueError as err:
            return None if "duplicate JSON object key" in str(err) else text
        except RecursionError:
            return text
    return text


def check_text(completion: Any, answer: str, max_chars: int = MAX_COMPLETION_CHARS) -> Verdict:
    """Exact match of the one-line answer after the last ``Answer:`` marker against ``answer``.

    Comparison is on :func:`canonical_text`: case-sensitive, whitespace runs collapsed, and when the reference is a
    JSON object/array the two are compared as parsed JSON (key order and spacing do not matter).
    """
    return check_marked(completion, answer, canonical_text, max_chars)


# ---- lenient answer format ----
ANSWER_FORMATS = ("strict", "lenient")

# "Answer:" in any case, also bolded ("**Answer:**", "**Answer**:"), or a LaTeX \boxed{...} (its braces matched by
# _braced, so that a JSON answer can sit inside).
_LENIENT_MARKERS = re.compile(r"answer[ \t*_]*:([^\n]*)|\\boxed[ \t]*(?=\{)", re.IGNORECASE)
# what an echo of the prompt's "End with 'Answer: <number>'." carries after the marker
_PLACEHOLDER = re.compile(r"[ \t]*<(?:number|text)>['\".]*[ \t]*")
_WRAPPERS = re.compile(r"\\(?:boxed|text|textbf|mathbf|mathrm)[ \t]*\{(.*)\}|\\\((.*)\\\)|\\\[(.*)\\\]"
                       r"|\$\$(.*)\$\$|\$(.*)\$|\"(.*)\"|'(.*)'")
_EDGE = " \t\r*_`"  # emphasis/code marks at either end (also the unbalanced "**" that closed "**Answer:**")
# an answer followed by one unit word ("42 apples"): letters only, so no second number hides there, and one word,
# so no phrase can take the answer back ("42 is wrong")
_UNIT_WORD = re.compile(r"(.*?\S)[ \t]+([A-Za-z]{2,})\.?")
# words that would change or hedge the number before them, so they are never read as a unit ("times" is a
# count's unit: "3 times"; a multiplier after it would be a number word, which is listed)
_NOT_UNITS = frozenset(
    "or and not nor no but than plus minus divided over by multiplied add added less more about around roughly "
    "approx approximately nearly almost maybe perhaps ish wrong incorrect false either neither negative positive "
    "point percent squared cubed "
    "half quarter dozen dozens hundred hundreds thousand thousands million millions billion billions bn mn "
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety".split())


def check_answer_format(answer_format: Any) -> str:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    return answer_format


@lru_cache(maxsize=4096)
def _lenient_char(c: str) -> str:
    if unicodedata.category(c) == "Nd":  # a decimal digit of any script: ８ (full-width), ٤ (Arabic-Indic)
        return str(unicodedata.decimal(c))
    if c == "\u2212":  # MINUS SIGN
        return "-"
    n = unicodedata.normalize("NFKC", c)
    # only Nd characters may become digits: NFKC also maps ² -> 2, ① -> 1, ㍘ -> 0点, which would forge numbers
    return c if any(ch.isdigit() or ch == "\n" for ch in n) else n


def normalize_lenient(text: str) -> str:
    """Per-character NFKC, except that only decimal digits (category Nd) of any script become ASCII digits."""
    return text if text.isascii() else "".join(map(_lenient_char, text))


def unwrap_answer(text: str) -> str:
    """Strip bold/italic/code marks at the ends and LaTeX/quote wrappers (``\\boxed{}``, ``$…$``, ``\\(…\\)``,
    ``"…"``) around a whole answer, repeatedly; never touches the inside, so ``8**2`` stays ``8**2``."""
    for _ in range(8):
        stripped = text.strip(_EDGE)
        if stripped.endswith("."):  # a sentence-final period after a wrapper: "**42**."
            stripped = stripped[:-1].rstrip(_EDGE)
        m = _WRAPPERS.fullmatch(stripped)
        if m is not None:
            stripped = next(g for g in m.groups() if g is not None)
        if stripped == text:
            break
        text = stripped
    return text


def lenient_integer(text: str) -> int | None:
    """:func:`parse_integer` after :func:`unwrap_answer`, allowing one trailing unit word (``42 apples``)."""
    text = unwrap_answer(text)
    m = _UNIT_WORD.fullmatch(text)
    if m is not None and m.group(2).lower() not in _NOT_UNITS:
        text = unwrap_answer(m.group(1))
    return parse_integer(text)


def lenient_text(text: str) -> str | None:
    """:func:`canonical_text` after :func:`unwrap_answer` (no unit words: they would change a text answer)."""
    return canonical_text(unwrap_answer(text))


def _braced(text: str, start: int) -> str | None:
    """The text inside the balanced braces opening at ``text[start] == "{"`` on one line, or None if unclosed."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        elif c == "\n":
            return None
    return None


def check_marked_lenient(completion: Any, answer: str, canonical: Callable[[str], Any],
                         max_chars: int = MAX_COMPLETION_CHARS,
                         normalize: Callable[[str], str] = normalize_lenient) -> Verdict:
    """:func:`check_marked` with the lenient markers (case-insensitive ``answer:`` and ``\\boxed{}``) on the
    ``normalize``-d completion (default :func:`normalize_lenient`); markers carrying the instruction's placeholder
    are skipped, every other marker must give the same well-formed value."""
    error = completion_error(completion, max_chars)
    if error is not None:
        return _bad(error)
    values = set()
    normalized = normalize(completion)
    for m in _LENIENT_MARKERS.finditer(normalized):
        text = m.group(1) if m.group(1) is not None else _braced(normalized, m.end())
        if text is None:  # an unclosed \boxed{: whatever it holds could be a second answer
            return _bad()
        if _PLACEHOLDER.fullmatch(text):
            continue
        values.add(canonical(text))
        if None in values or len(values) > 1:
            return _bad()
    if len(values) != 1:
        return _bad()
    value = values.pop()
    correct = value == canonical(answer)
    return Verdict(1.0 if correct else 0.0, correct, True, str(value), None)


def check_number_lenient(completion: Any, answer: str, max_chars: int = MAX_COMPLETION_CHARS) -> Verdict:
    """Lenient-format integer match (:func:`lenient_integer`): ``**42**``, ``\\boxed{42}``, ``answer: 42``,
    ``Answer: 42 apples``, ``Answer: ４２``; all markers must agree."""
    return check_marked_lenient(completion, answer, lenient_integer, max_chars)


def check_text_lenient(completion: Any, answer: str, max_chars: int = MAX_COMPLETION_CHARS) -> Verdict:
    """Lenient-format text match (:func:`lenient_text`); a reference that is an integer (a count) is compared as
    :func:`check_number_lenient` does."""
    if parse_integer(answer) is not None:
        return check_number_lenient(completion, answer, max_chars)
    return check_marked_lenient(completion, answer, lenient_text, max_chars)


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

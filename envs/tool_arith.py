"""Multi-turn arithmetic with a calculator tool -> ``ArithToolRLVR-v0``.

An episode is a conversation. The prompt states the problem and the tool syntax; each ``step(text)`` is one policy
turn::

    reset()                      -> "Compute 37*45+12. Tool: write <calc>EXPR</calc> ... End with 'Answer: <number>'.\\n"
    step("<calc>37*45+12</calc>") -> ("\\n<result>1677</result>\\n", 0.0, terminated=False, truncated=False, info)
    step("Answer: 1677")          -> ("", 1.0, terminated=True, truncated=False, info)

Turn rule (:func:`calc_call`): a turn holding a complete ``<calc>EXPR</calc>`` is a tool call: the env evaluates
the first call's EXPR (:func:`calculate`: integers, ``+ - *``, parentheses, at most :data:`MAX_EXPR_CHARS` chars and
values below 10**18 in size) and replies ``\\n<result>VALUE</result>\\n`` (or ``\\n<result>error: WHY</result>\\n``,
which costs the turn and nothing else). Any other turn is the final answer and ends the episode. A trainer
should stop generating at :data:`TOOL_STOP` (``</calc>``) so that a turn holds one call.

Reward, only at the end: the env's verifier (:mod:`envs.verify`, ``answer_format`` strict or lenient) on the whole
transcript after the prompt, i.e. every policy turn and env reply joined; env replies never hold an answer marker,
so this is the verifier on the policy's text, and a marked answer in an earlier turn that disagrees with the final
one is a hedge (reward 0). ``max_turns`` policy turns without a final answer: ``truncated=True``, reward 0. A
malformed action (not a string, too long, invalid unicode) ends the episode: reward 0, ``info["error"]``.

Environment text and loss masking: ``info["segments"]`` (and :meth:`ArithToolEnv.segments`) is the episode so far as
``(text, is_env)`` pairs: the prompt and every env reply are env text (``is_env=True``), the policy turns are not.
The pairs concatenate to the transcript, so a trainer tokenizes them one by one and masks the env ones out of
the loss. :func:`demonstration_segments` gives the same pairs for a task's demonstration (multi-turn SFT) and
:func:`rollout` plays a whole episode with any ``act(transcript) -> turn`` function.

Tasks are the arithmetic env's problems (:class:`~envs.arith.ArithEnv`: hashed splits, twins sharing a split,
``reset(options={"difficulty": k})``), at tool-worthy defaults (:data:`TOOL_DEFAULT`: 2-3 digits, ``+ - *``, 1-2
operations). ``Task.demonstration`` is the whole transcript after the prompt; ``meta["turns"]`` (and
``info["demonstration_turns"]``) the policy turns to replay it with ``step``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from envs.arith import ArithConfig, ArithEnv
from envs.core import Task
from envs.verify import completion_error

TOOL_STOP = "</calc>"
MAX_EXPR_CHARS = 64
MAX_ABS_VALUE = 10**18
TOOL_INSTRUCTION = ("Tool: write <calc>EXPR</calc> (integers, + - * and parentheses) and stop; the result comes "
                    "back as <result>VALUE</result>.")
TOOL_DEFAULT = ArithConfig(min_digits=2, max_digits=3, ops="+-*", min_ops=1, max_ops=2, parens=0.3,
                           nonnegative=False)
_CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
_TOKEN = re.compile(r"\s*(?:(\d+)|(.))", re.ASCII)


def calc_call(turn: str) -> str | None:
    """The expression of the first complete ``<calc>…</calc>`` call in ``turn``, or None (a final-answer turn)."""
    if "<calc>" not in turn:  # fast path: most final turns
        return None
    m = _CALL.search(turn)
    return None if m is None else m.group(1)


def calculate(expr: str) -> tuple[int | None, str | None]:
    """(value, None) of an integer expression over ``+ - *`` and parentheses (unary minus allowed), or
    (None, why). Recursive descent, never ``eval``; bounded by :data:`MAX_EXPR_CHARS` and :data:`MAX_ABS_VALUE`."""
    if len(expr) > MAX_EXPR_CHARS:
        return None, f"expression longer than {MAX_EXPR_CHARS} characters"
    tokens = []
    pos = 0
    text = expr.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        number, symbol = m.groups()
        if symbol is not None and symbol not in "+-*()":
            return None, f"unsupported character {symbol!a}"  # ascii(): replies stay in the charset
        tokens.append(int(number) if number is not None else symbol)
        pos = m.end()
    if not tokens:
        return None, "empty expression"
    try:
        value, k = _sum(tokens, 0)
    except (IndexError, ValueError, OverflowError) as err:
        return None, str(err) or "malformed expression"
    if k != len(tokens):
        return None, "malformed expression"
    return value, None


def _bounded(value: int) -> int:
    if abs(value) >= MAX_ABS_VALUE:
        raise OverflowError("value too large")
    return value


def _sum(tokens: list, k: int) -> tuple[int, int]:
    value, k = _product(tokens, k)
    while k < len(tokens) and tokens[k] in ("+", "-"):
        right, after = _product(tokens, k + 1)
        value, k = _bounded(value + right if tokens[k] == "+" else value - right), after
    return value, k


def _product(tokens: list, k: int) -> tuple[int, int]:
    value, k = _atom(tokens, k)
    while k < len(tokens) and tokens[k] == "*":
        right, k = _atom(tokens, k + 1)
        value = _bounded(value * right)
    return value, k


def _atom(tokens: list, k: int) -> tuple[int, int]:
    t = tokens[k]
    if t == "-":
        value, k = _atom(tokens, k + 1)
        return -value, k
    if t == "(":
        value, k = _sum(tokens, k + 1)
        if k >= len(tokens) or tokens[k] != ")":
            raise ValueError("unbalanced parentheses")
        return value, k + 1
    if isinstance(t, int):
        return _bounded(t), k + 1
    raise ValueError("malformed expression")


def tool_reply(turn: str) -> str | None:
    """The env's reply to a policy turn: ``"\\n<result>…</result>\\n"`` for a tool call, None for a final turn."""
    expr = calc_call(turn)
    if expr is None:
        return None
    value, why = calculate(expr)
    return f"\n<result>{value}</result>\n" if why is None else f"\n<result>error: {why}</result>\n"


def demonstration_segments(task: Task) -> list[tuple[str, bool]]:
    """``(text, is_env)`` pairs of ``task``'s demonstrated episode: the prompt (env), then each demonstrated turn
    (policy) followed by the env's reply to it (env) when it is a tool call. They concatenate to
    ``task.prompt + task.demonstration``."""
    segments = [(task.prompt, True)]
    for turn in task.meta["turns"]:
        segments.append((turn, False))
        reply = tool_reply(turn)
        if reply is not None:
            segments.append((reply, True))
    return segments


@dataclass
class Episode:
    """One played episode: the ``(text, is_env)`` segments, the final reward, and how it ended."""

    segments: list[tuple[str, bool]]
    reward: float
    terminated: bool
    truncated: bool
    turns: int
    info: dict

    @property
    def transcript(self) -> str:
        return "".join(text for text, _ in self.segments)


def rollout(env, act: Callable[[str], Any], seed: int | None = None, options: dict | None = None) -> Episode:
    """Play one episode of a multi-turn env: ``act(transcript so far) -> next turn`` until it ends."""
    obs, info = env.reset(seed=seed, options=options)
    transcript, turns = obs, 0
    while True:
        obs, reward, terminated, truncated, info = env.step(act(transcript))
        turns += 1
        if terminated or truncated:
            return Episode(list(info["segments"]), float(reward), terminated, truncated, turns, info)
        transcript = "".join(text for text, _ in info["segments"])


class ArithToolEnv(ArithEnv):
    """Multi-turn arithmetic with a calculator (see the module docstring for the turn rule and the reward).

    ## Action / Observation Space
    ``Text(max_completion_chars, charset=CHARSET, min_length=0)``: one policy turn / the prompt, then each env reply
    (``""`` when the episode ends).

    ## Arguments
    ``max_turns`` (default 4) policy turns per episode; the :class:`~envs.arith.ArithConfig` knobs (defaults
    :data:`TOOL_DEFAULT`); ``answer_format``; the :class:`~envs.core.TextTaskEnv` arguments.

    ## Version History
    * v0: initial version.
    """

    family = "arith_tool"

    def __init__(self, *, max_turns: int = 4, **kwargs):
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be an int >= 1, got {max_turns!r}")
        for knob, default in asdict(TOOL_DEFAULT).items():
            kwargs.setdefault(knob, default)
        super().__init__(**kwargs)
        self.max_turns = max_turns
        self._env_kwargs["max_turns"] = max_turns
        self._segments: list[tuple[str, bool]] = []
        self._turns = 0

    def build(self, key, p, task_id):
        answer = str(p["value"])
        turns = [f"<calc>{key}</calc>", f"Answer: {answer}"]
        reply = tool_reply(turns[0])
        return Task(
            prompt=f"{p['text']} {TOOL_INSTRUCTION} End with 'Answer: <number>'.\n",
            answer=answer,
            demonstration=turns[0] + reply + turns[1],
            task_id=task_id,
            family=self.family,
            meta={"key": key, "split_key": p["split_key"], "word": p["word"], "n_ops": p["n_ops"], "turns": turns,
                  **self._knobs},
        )

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        prompt, info = super().reset(seed=seed, options=options)
        self._segments, self._turns = [(prompt, True)], 0
        info["demonstration_turns"] = list(info["meta"]["turns"])
        info["segments"] = tuple(self._segments)
        return prompt, info

    @property
    def max_transcript_chars(self) -> int:
        """Longest scorable transcript after the prompt: ``max_turns`` full turns and their replies."""
        return self.max_turns * (self.max_completion_chars + MAX_EXPR_CHARS + 64)

    def check(self, completion, answer):
        """The verifier on a transcript after the prompt (a single final turn is a transcript too)."""
        return self._check(completion, answer, self.max_transcript_chars)

    turn_stop = "</calc>"  # a tool call ends its turn: the calculator answers before the policy goes on

    def reply(self, turn: str) -> str | None:
        """The calculator's reply to a turn holding ``<calc>EXPR</calc>``; None for any other (final) turn."""
        return tool_reply(turn)

    def demonstration_segments(self, task: Task) -> list[tuple[str, bool]]:
        """The prompt (env), each demonstrated turn (policy) and the calculator's reply to it (env)."""
        return demonstration_segments(task)

    def segments(self) -> list[tuple[str, bool]]:
        """The episode so far as ``(text, is_env)`` pairs (they concatenate to the transcript)."""
        return list(self._segments)

    def step(self, action: Any) -> tuple[str, float, bool, bool, dict]:
        if self._task is None or self._done:
            return super().step(action)  # ResetNeeded before the first reset; the terminated answer after the end
        task = self._task
        error = completion_error(action, self.max_completion_chars)
        if error is not None:
            self._done = True
            info = {"answer": task.answer, "parsed": None, "correct": False, "format_ok": False, "error": error,
                    "task_id": task.task_id, "turn": self._turns, "tool_call": False,
                    "segments": tuple(self._segments)}
            return "", 0.0, True, False, info
        self._turns += 1
        self._segments.append((action, False))
        reply = self.reply(action)
        info = {"answer": task.answer, "task_id": task.task_id, "turn": self._turns, "tool_call": reply is not None}
        if reply is not None:
            if self._turns >= self.max_turns:  # no reply: the episode is cut before the policy could answer
                self._done = True
                info |= {"parsed": None, "correct": False, "format_ok": False, "error": None,
                         "truncated_reason": f"{self.max_turns} turns without a final answer",
                         "segments": tuple(self._segments)}
                return "", 0.0, False, True, info
            self._segments.append((reply, True))
            info["segments"] = tuple(self._segments)
            return reply, 0.0, False, False, info
        self._done = True
        self._last_completion = "".join(text for text, _ in self._segments[1:])
        v = self.check(self._last_completion, task.answer)
        info |= {"parsed": v.parsed, "correct": v.correct, "format_ok": v.format_ok, "error": v.error,
                 "segments": tuple(self._segments)}
        return "", v.reward, True, False, info

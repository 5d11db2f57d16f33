"""Procedurally generated arithmetic with exact integer answers -> ``ArithRLVR-v0`` and presets.

Problems are integer expressions over ``+ - *`` (``n_ops`` operators, operands of ``min_digits..max_digits``
digits, optionally one parenthesised sub-expression) or one-operation word problems. No division, so every answer
is an exact integer.

Format (marker documented in :mod:`envs.verify`)::

    prompt:        "Compute 37+45. End with 'Answer: <number>'.\\n"
    demonstration: "7+5=12\\n3+4+1=8\\n37+45=82\\nAnswer: 82"   (one + or -: column working, units first)
    multi-step:    "3+4*5=3+20=23\\nAnswer: 23"     (one operation reduced per "=", '*' before '+/-')

The column working (``working="columns"``, the default; ``"direct"`` gives ``"37+45=82"``) is what makes the task
learnable by the embedded 1M-parameter model: each line is a one-digit fact plus a carry, all of which occur in
the training data, so held-out problems are new combinations of seen steps. Measured with AdamW 1e-3, batch 64,
on the embedded model: held-out accuracy 0.07 ("direct") vs 0.19 ("columns") after 500 SFT steps.

``meta["key"]`` is the problem's expression (``"37+45"``; a word problem has the key of its bare expression) and
deduplicates the dataset. ``meta["split_key"]`` (:func:`split_key`) decides the split: it is the same for every
problem whose expression tree equals this one up to swapping the two operands of any ``+`` or ``*``, so ``1+3``
and ``3+1``, or ``2*(4+5)`` and ``(5+4)*2``, always land in the same split. It does not identify problems equal
only by associativity (``1+2+3`` vs ``1+3+2``) or by value.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace

from envs.core import RESET_OPTIONS, SPLITS, ProceduralTaskEnv, Task, Uniforms, split_of
from envs.verify import Verdict, check_answer_format, check_number, check_number_lenient

INSTRUCTION = "End with 'Answer: <number>'."
_NAMES = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana")
_ITEMS = ("apples", "pens", "cards", "coins", "books", "eggs", "shells", "stamps")
_WORD_TEMPLATES = {
    "+": "{n} has {a} {i} and gets {b} more. How many {i} does {n} have now?",
    "-": "{n} has {a} {i} and gives away {b}. How many {i} are left?",
    "*": "{n} buys {a} bags with {b} {i} in each. How many {i} in total?",
}


WORKING_STYLES = ("columns", "direct")


@dataclass(frozen=True)
class ArithConfig:
    """Difficulty knobs. The defaults are the easy ``ArithRLVR-v0`` setting (1-2 digit add/sub, one operation)."""

    min_digits: int = 1
    max_digits: int = 2
    ops: str = "+-"  # operators to draw from, a subset of "+-*"
    min_ops: int = 1  # operations per expression
    max_ops: int = 1
    parens: float = 0.0  # probability of one parenthesised sub-expression (when there are >= 2 operations)
    word_problems: float = 0.0  # probability that a problem is a one-operation word problem
    nonnegative: bool = True  # redraw problems with a negative intermediate or final value
    # demonstration style: "columns" = digit-by-digit working for one + or - (see column_steps), "direct" = "37+45=82"
    working: str = "columns"

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits <= 9:
            raise ValueError(f"need 1 <= min_digits <= max_digits <= 9, got {self.min_digits}, {self.max_digits}")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {self.ops!r}")
        if not 1 <= self.min_ops <= self.max_ops <= 6:
            raise ValueError(f"need 1 <= min_ops <= max_ops <= 6, got {self.min_ops}, {self.max_ops}")
        if self.working not in WORKING_STYLES:
            raise ValueError(f"working must be one of {WORKING_STYLES}, got {self.working!r}")
        for name in ("parens", "word_problems"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")


_KNOBS = frozenset(f.name for f in fields(ArithConfig))
HARD = ArithConfig(min_digits=1, max_digits=3, ops="+-*", min_ops=1, max_ops=3, parens=0.5, word_problems=0.2,
                   nonnegative=False)
# The curriculum ladder, easiest first: ``reset(options={"difficulty": k})`` draws the episode's problem from
# level k (the env's ``working`` style kept). Level 2 is ArithRLVR-v0's default, the last level is HARD.
DIFFICULTY_LEVELS = (
    ArithConfig(min_digits=1, max_digits=1, ops="+"),
    ArithConfig(min_digits=1, max_digits=1, ops="+-"),
    ArithConfig(),
    ArithConfig(min_digits=2, max_digits=2, ops="+-*"),
    ArithConfig(min_digits=1, max_digits=3, ops="+-*", min_ops=1, max_ops=2, parens=0.5, nonnegative=False),
    HARD,
)


# ---- expressions as token lists: ints, operator chars, "(" and ")" ----
def _render(tokens: list) -> str:
    out = []
    for k, t in enumerate(tokens):
        if isinstance(t, int) and t < 0 and k > 0 and tokens[k - 1] in ("+", "-", "*"):
            out.append(f"({t})")  # "3*(-2)", not "3*-2"
        else:
            out.append(str(t))
    return "".join(out)


def _reduce_once(tokens: list) -> list:
    """Apply one operation: innermost parentheses first, then '*' before '+/-', leftmost first."""
    lo, hi = 0, len(tokens)
    if "(" in tokens:
        close = tokens.index(")")
        lo = close - 1 - tokens[close - 1 :: -1].index("(")  # the "(" that matches the first ")"
        if close - lo == 2:  # "(x)" -> "x"
            return tokens[:lo] + [tokens[lo + 1]] + tokens[close + 1 :]
        lo, hi = lo + 1, close
    span = tokens[lo:hi]
    k = span.index("*") if "*" in span else 1
    a, op, b = span[k - 1], span[k], span[k + 1]
    value = a + b if op == "+" else a - b if op == "-" else a * b
    i = lo + k - 1
    out = tokens[:i] + [value] + tokens[i + 3 :]
    if "(" in out and i - 1 >= 0 and out[i - 1] == "(" and out[i + 1] == ")":
        out = out[: i - 1] + [value] + out[i + 2 :]  # drop the parentheses around a finished value
    return out


def solve(tokens: list) -> tuple[list[str], int, bool]:
    """(rendered steps from the expression to its value, value, whether every intermediate value is >= 0)."""
    steps, nonneg = [_render(tokens)], True
    while len(tokens) > 1:
        tokens = _reduce_once(tokens)
        nonneg = nonneg and all(t >= 0 for t in tokens if isinstance(t, int))
        steps.append(_render(tokens))
    return steps, tokens[0], nonneg


def column_steps(a: int, op: str, b: int) -> str:
    """Column-by-column working of ``a+b`` or ``a-b`` (``a >= b >= 0``), units first, ending in the result line:

        "37+45": "7+5=12\n3+4+1=8\n37+45=82"     (a carry is added into the next column)
        "82-45": "12-5=7\n8-1-4=3\n82-45=37"     (a borrowed ten is written into the column, then paid back)

    Every line is a one-digit fact, so a model that learns the ~200 of them (all of which occur in any few thousand
    training problems) and the column walk can solve problems it never saw."""
    lines, carry, i = [], 0, 0
    while 10**i <= max(a, b) or i == 0:
        x, y = a // 10**i % 10, b // 10**i % 10
        if op == "+":
            total = x + y + carry
            lines.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
            carry = total // 10
        else:
            top = x - carry
            borrow = int(top < y)
            lines.append(f"{x + 10 * borrow}" + (f"-{carry}" if carry else "") + f"-{y}={top + 10 * borrow - y}")
            carry = borrow
        i += 1
    if carry and op == "+":
        lines.append(f"0+0+{carry}={carry}")
    value = a + b if op == "+" else a - b
    return "\n".join(lines + [f"{a}{op}{b}={value}"])


def working(steps: list[str], style: str = "columns") -> str:
    """The demonstration's working for a problem whose reduction is ``steps`` (see :func:`solve`): the column
    working of :func:`column_steps` for one ``+`` or ``-`` of non-negative integers in ``"columns"`` style, else the
    reduction chain ``"3+4*5=3+20=23"``."""
    m = re.fullmatch(r"(\d+)([-+])(\d+)", steps[0]) if style == "columns" and len(steps) == 2 else None
    if m and (m[2] == "+" or int(m[1]) >= int(m[3])):
        return column_steps(int(m[1]), m[2], int(m[3]))
    return "=".join(steps)


def _parse(tokens: list, pos: int = 0) -> tuple:
    """(parse tree of the sum starting at ``tokens[pos]``, position after it): ``*`` binds tighter than ``+ -``,
    all left-associative. A tree is an int or ``(op, left, right)``."""
    left, pos = _parse_product(tokens, pos)
    while pos < len(tokens) and tokens[pos] in ("+", "-"):
        right, after = _parse_product(tokens, pos + 1)
        left, pos = (tokens[pos], left, right), after
    return left, pos


def _parse_product(tokens: list, pos: int) -> tuple:
    left, pos = _parse_atom(tokens, pos)
    while pos < len(tokens) and tokens[pos] == "*":
        right, after = _parse_atom(tokens, pos + 1)
        left, pos = ("*", left, right), after
    return left, pos


def _parse_atom(tokens: list, pos: int) -> tuple:
    if tokens[pos] == "(":
        tree, pos = _parse(tokens, pos + 1)
        return tree, pos + 1  # past the ")"
    return tokens[pos], pos + 1


def _canonical(tree) -> str:
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    a, b = _canonical(left), _canonical(right)
    if op in "+*" and b < a:  # commutative: one order for both
        a, b = b, a
    return f"({a}{op}{b})"


def split_key(tokens: list) -> str:
    """The split key of an expression (token list): its parse tree printed fully parenthesised, the operands of
    every ``+`` and ``*`` in string order, outer parentheses dropped: ``3+1`` -> ``1+3``; ``3+4*5`` ->
    ``(4*5)+3``."""
    key = _canonical(_parse(tokens)[0])
    return key[1:-1] if key.startswith("(") else key


def draw_problem(cfg: ArithConfig, r: Uniforms) -> dict:
    """One problem: {"key", "split_key", "word", "steps", "value", "n_ops", "text"}; ``key`` is the expression,
    ``split_key`` its :func:`split_key`."""
    for _ in range(1000):
        word = cfg.word_problems > 0.0 and r.u() < cfg.word_problems
        n_ops = 1 if word or cfg.min_ops == cfg.max_ops == 1 else r.int(cfg.min_ops, cfg.max_ops)
        values = []
        for _ in range(n_ops + 1):
            d = cfg.min_digits if cfg.min_digits == cfg.max_digits else r.int(cfg.min_digits, cfg.max_digits)
            values.append(r.int(0 if d == 1 else 10 ** (d - 1), 10**d - 1))
        ops = [r.pick(cfg.ops) for _ in range(n_ops)]
        if n_ops == 1:
            a, op, b = values[0], ops[0], values[1]
            if op == "-" and a < b and (cfg.nonnegative or word):  # "gives away" never exceeds what one has
                a, b = b, a
            key = f"{a}{op}{b}"
            value = a + b if op == "+" else a - b if op == "-" else a * b
            steps = [key, str(value)]
            tokens = [a, op, b]
        else:
            tokens: list = [values[0]]
            for op, v in zip(ops, values[1:]):
                tokens += [op, v]
            if cfg.parens > 0.0 and r.u() < cfg.parens:
                i = r.int(0, n_ops - 1)  # first operand inside; the span has >= 2 operands, never all of them
                j = r.int(i + 1, n_ops - 1 if i == 0 else n_ops)
                tokens = tokens[: 2 * i] + ["("] + tokens[2 * i : 2 * j + 1] + [")"] + tokens[2 * j + 1 :]
            steps, value, nonneg = solve(tokens)
            if cfg.nonnegative and not nonneg:
                continue
            key = steps[0]
        if word:
            text = _WORD_TEMPLATES[op].format(n=r.pick(_NAMES), i=r.pick(_ITEMS), a=a, b=b)
        else:
            text = f"Compute {key}."
        return {"key": key, "split_key": split_key(tokens), "word": word, "steps": steps, "value": value,
                "n_ops": n_ops, "text": text}
    raise RuntimeError(f"no valid problem in 1000 draws for {cfg}")  # unreachable for validated configs


class ArithEnv(ProceduralTaskEnv):
    """Arithmetic RLVR env (``ArithRLVR-v0``: 1-2 digit add/sub; ``ArithRLVR-hard-v0``: see :data:`HARD`).

    ## Description
    One problem per episode; the completion must end with ``Answer: <integer>``; reward 1 for the exact value
    after the last marker (all markers agreeing), else 0. ``info["meta"]`` holds the expression, the operation
    count and the knobs.

    ## Action / Observation Space
    ``Text(max_completion_chars, charset=CHARSET, min_length=0)`` / ``Text(512, charset=CHARSET, min_length=0)``.

    ## Arguments
    The :class:`ArithConfig` fields as keyword arguments; ``answer_format``: ``"strict"`` (default, exactly
    ``Answer: <integer>``) or ``"lenient"`` (also ``**42**``, ``\\boxed{42}``, ``answer: 42``, ``42 apples``,
    other scripts' digits; see :mod:`envs.verify`); plus the :class:`~envs.core.TextTaskEnv` arguments.

    ## Version History
    * v0: initial version; demonstrations of one-operation problems show column working (``working="columns"``)
      since 2026-12 (the lab had no results to keep comparable).
    """

    family = "arith"
    reset_options = RESET_OPTIONS + ("difficulty",)
    n_levels = len(DIFFICULTY_LEVELS)  # reset(options={"difficulty": k}) for k < n_levels

    def __init__(self, *, answer_format: str = "strict", **kwargs):
        knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in _KNOBS}  # the rest go to TextTaskEnv
        self.config = ArithConfig(**knobs)
        self._knobs = asdict(self.config)
        self.answer_format = check_answer_format(answer_format)
        self._check = check_number if answer_format == "strict" else check_number_lenient
        self._env_kwargs = dict(kwargs, answer_format=answer_format)  # rebuilds this env at another difficulty
        self._levels: dict[int, ArithEnv] = {}
        super().__init__(**kwargs)

    @classmethod
    def kwarg_names(cls) -> frozenset[str]:
        """The TextTaskEnv arguments, ``answer_format`` and every ArithConfig knob (taken through ``**kwargs``)."""
        return super().kwarg_names() | _KNOBS

    def at_difficulty(self, level: int) -> ArithEnv:
        """This env (same class, seeds, split, format) with :data:`DIFFICULTY_LEVELS` ``[level]``'s knobs."""
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < len(DIFFICULTY_LEVELS):
            raise ValueError(f"options['difficulty'] must be an int in [0, {len(DIFFICULTY_LEVELS) - 1}], "
                             f"got {level!r}")
        if level not in self._levels:
            knobs = asdict(replace(DIFFICULTY_LEVELS[level], working=self.config.working))
            self._levels[level] = type(self)(**self._env_kwargs, **knobs)
        return self._levels[level]

    def episode_task(self, options: dict, source=None) -> Task:
        """``options["difficulty"] = k`` draws the task from :meth:`at_difficulty` ``(k)``; its ``task_id`` ends
        in ``@d<k>`` and ``meta["difficulty"]`` is k (``meta``'s knobs are the level's)."""
        level = options.get("difficulty")
        if level is None:
            return super().episode_task(options, source)
        task = super().episode_task(options, self.at_difficulty(level))
        return replace(task, task_id=f"{task.task_id}@d{level}", meta={**task.meta, "difficulty": level})

    def draw(self, r):
        p = draw_problem(self.config, r)
        return p["key"], p

    def split_key_of(self, key, p):
        return p["split_key"]

    def build(self, key, p, task_id):
        answer = str(p["value"])
        return Task(
            prompt=f"{p['text']} {INSTRUCTION}\n",
            answer=answer,
            demonstration=working(p["steps"], self.config.working) + "\nAnswer: " + answer,
            task_id=task_id,
            family=self.family,
            meta={"key": key, "split_key": p["split_key"], "word": p["word"], "n_ops": p["n_ops"], **self._knobs},
        )

    def check(self, completion, answer) -> Verdict:
        return self._check(completion, answer, self.max_completion_chars)


def arithmetic_corpus(n: int, seed: int = 0, config: ArithConfig = ArithConfig(), test_fraction: float = 0.1
                      ) -> list[str]:
    """``n`` plain expression lines such as ``"37+45=82"`` (multi-step: ``"3+4*5=3+20=23"``) for pre-training text.

    Only train-split problems of the ``test_fraction`` partition (the envs' default is 0.1) are used, so no test
    problem leaks into pre-training. Line ``i`` comes from ``Uniforms(seed, 2, i)`` (stream 2 = corpus, distinct
    from the train/test task streams 0/1).
    """
    if n < 0 or seed < 0:
        raise ValueError(f"n and seed must be >= 0, got n={n}, seed={seed}")
    lines, corpus_stream = [], len(SPLITS)
    for i in range(n):
        r = Uniforms(seed, corpus_stream, i)
        while True:
            p = draw_problem(config, r)
            if split_of(p["split_key"], test_fraction) == "train":
                break
        lines.append("=".join(p["steps"]))
    return lines

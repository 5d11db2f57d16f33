"""TextTaskEnv: the single-turn text-task gymnasium env that every registered id unwraps to.

Episode = one task: ``reset`` returns the prompt, ``step(completion)`` scores it and terminates.
Tasks are pure functions of ``(base_seed, split, index)``; subclasses supply :meth:`TextTaskEnv.task` and
:meth:`TextTaskEnv.check`. Text spaces are gymnasium ``Text`` spaces over :data:`CHARSET` (every char the env
emits) with ``min_length=0`` (the terminal observation is ``""``); they are built once in ``__init__``.

Order of calls (gymnasium documents that ``reset`` is needed before ``step`` and after ``terminated``):

* ``step`` before the first ``reset`` raises ``gymnasium.error.ResetNeeded``, exactly as gymnasium's
  ``OrderEnforcing`` wrapper (added by ``gym.make``) does, so raw and made envs agree.
* ``step`` after the episode terminated does not score again: it returns ``("", 0.0, True, False, info)`` with
  ``info["error"]`` saying to call ``reset()``.
* ``step`` never raises on a bad action (None, bytes, ints, lists, huge or invalid-unicode strings): reward 0 and
  ``info["error"]``. gymnasium's passive checker does not validate actions, so the env does it.
"""

from __future__ import annotations

import hashlib
import inspect
import string
import zlib
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.error import ResetNeeded

from envs.verify import MAX_COMPLETION_CHARS, Verdict

CHARSET = string.digits + string.ascii_letters + string.punctuation + " \n\t"
SPLITS = {"train": 0, "test": 1}  # split id = the stream that enters every item seed (see Uniforms)
RESET_OPTIONS = ("index", "split")
_PARTITION_SALT = b"eoslab-split-v0|"


@dataclass(frozen=True)
class Task:
    """One task. ``prompt + demonstration`` is the SFT text; ``score(demonstration, answer) == 1``."""

    prompt: str  # full prompt, format instruction included; the completion is appended directly after it
    answer: str  # canonical ground truth
    demonstration: str  # a completion that the verifier scores 1.0
    task_id: str  # stable id "<family>/<split>/<index>"
    family: str
    meta: dict = field(default_factory=dict)  # difficulty knobs etc., JSON-serialisable


def split_of(key: str, test_fraction: float) -> str:
    """Which split a canonical problem ``key`` belongs to: a fixed hash partition of the problem space.

    ``crc32(salt + key) / 2**32 < test_fraction`` -> "test", else "train". Train and test can never share a
    key, in dataset mode and in infinite mode alike, whatever the seeds.

    Split key v1: envs pass the key that identifies twins of a problem (:meth:`TextTaskEnv.split_key`; the
    arithmetic envs' ``meta["split_key"]`` is the same for ``1+3`` and ``3+1``), so a problem and its twins share
    a split. (v0 keyed on ``meta["key"]``: 366 of the 598 commutative one-operation test problems of the default
    ArithRLVR-v0 dataset had their swapped twin in train.) Env ids are unchanged: same problems, new partition.
    """
    return "test" if zlib.crc32(_PARTITION_SALT + key.encode()) < test_fraction * 4294967296.0 else "train"


TRAIN_POOLS = ("sft", "rl")  # disjoint parts of the train split: behaviour cloning vs reinforcement learning
RL_POOL_SHARE = 0.2
_POOL_SALT = b"eoslab-pool-v0|"


def pool_of(key: str, rl_share: float = RL_POOL_SHARE) -> str:
    """Which train pool a problem belongs to, given its split key (shared by twins): the first 8 bytes of ``sha256(pool salt + key)``,
    read as a fraction of 2**64, below ``rl_share`` -> "rl", else "sft". A second hash partition (its own salt,
    so it is independent of :func:`split_of`), so RL after SFT trains on problems the SFT data never contained,
    whatever either run's ``n_train``. sha256, not crc32: crc32 is affine in the key's bits, and the pools of
    short structured keys like "37+45" came out 17 % / 83 % instead of 20 / 80."""
    h = int.from_bytes(hashlib.sha256(_POOL_SALT + key.encode()).digest()[:8], "big")
    return "rl" if h < rl_share * 18446744073709551616.0 else "sft"


def check_split(split: Any) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return split


class TextTaskEnv(gym.Env[str, str]):
    """Base class: single-turn prompt -> completion -> verifier reward in [0, 1].

    Args:
        split: split that ``reset`` samples from unless ``options["split"]`` says otherwise.
        base_seed: dataset seed; item ``index`` of ``split`` is drawn from
            the SeedSequence hash of ``(base_seed, SPLITS[split], index)`` (see :class:`Uniforms`; never
            ``seed + index``, which would make neighbouring seeds shifted copies of each other). Indices < 2**32.
        mode: "infinite" (``reset`` draws any index) or "dataset" (``reset`` draws from the fixed
            ``tasks(split)`` list of ``dataset_size`` problems).
        dataset_size: problems in dataset mode, train + test; test gets ``round(dataset_size * test_fraction)``.
        test_fraction: share of the problem space (and of the dataset) held out as the test split.
        max_completion_chars: longer completions score 0 with an error (also the action space's max length).
        render_mode: None or "ansi".
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}
    verifiable = True  # False for soft-scored envs (reward is a similarity, not a check)
    reset_options = RESET_OPTIONS  # the keys reset(options=...) accepts
    max_prompt_chars = 512

    @classmethod
    def kwarg_names(cls) -> frozenset[str]:
        """Keyword arguments ``gym.make(<id of this class>, ...)`` accepts: the named parameters of ``__init__``
        along the MRO (a subclass that takes more through ``**kwargs`` adds them by overriding this)."""
        names = set()
        for klass in cls.__mro__:
            if isinstance(klass, type) and issubclass(klass, TextTaskEnv):
                names |= {p.name for p in inspect.signature(klass.__init__).parameters.values()
                          if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        return frozenset(names)

    def __init__(
        self,
        *,
        split: str = "train",
        base_seed: int = 0,
        mode: str = "infinite",
        dataset_size: int = 10_000,
        test_fraction: float = 0.1,
        max_completion_chars: int = MAX_COMPLETION_CHARS,
        charset: str = CHARSET,
        render_mode: str | None = None,
    ):
        self.split = check_split(split)
        if mode not in ("infinite", "dataset"):
            raise ValueError(f"mode must be 'infinite' or 'dataset', got {mode!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if isinstance(base_seed, bool) or not isinstance(base_seed, (int, np.integer)) or base_seed < 0:
            raise ValueError(f"base_seed must be a non-negative int, got {base_seed!r}")
        if dataset_size < 2:
            raise ValueError(f"dataset_size must be >= 2, got {dataset_size}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.base_seed = int(base_seed)
        self.mode = mode
        self.dataset_size = int(dataset_size)
        self.test_fraction = float(test_fraction)
        self.max_completion_chars = int(max_completion_chars)
        self.render_mode = render_mode
        self.observation_space = spaces.Text(self.max_prompt_chars, min_length=0, charset=charset)
        self.action_space = spaces.Text(self.max_completion_chars, min_length=0, charset=charset)
        self._task: Task | None = None
        self._done = False
        self._last_completion: Any = None
        self._datasets: dict[str, list[Task]] = {}

    # ---- subclass interface ----
    def task(self, index: int, split: str | None = None) -> Task:
        """Task number ``index`` of ``split`` (default: the env's split); pure and deterministic."""
        raise NotImplementedError

    def check(self, completion: Any, answer: str) -> Verdict:
        """Verifier with diagnostics; never raises."""
        raise NotImplementedError

    def problem_key(self, task: Task) -> str:
        """Canonical problem used to deduplicate the dataset (default: the prompt)."""
        return task.prompt

    def split_key(self, task: Task) -> str:
        """Key whose :func:`split_of` gives the task's split; shared by twins (default: :meth:`problem_key`)."""
        return self.problem_key(task)

    def format_answer(self, answer: str) -> str:
        """Shortest completion that states ``answer`` in the env's format (used by the SB3 answer-choice view)."""
        return f"Answer: {answer}"

    #: policy turns per episode (1: one completion, scored at once); see ``reply``
    max_turns: int = 1
    #: text that ends a turn early (e.g. a tool call's closing tag), or None
    turn_stop: str | None = None

    def reply(self, turn: str) -> str | None:
        """The env's reply to a policy turn that is not the episode's last (a tool result), or None when the turn
        ends the episode. Pure: a rollout calls it to play the episode without ``step``. One-turn envs: None."""
        return None

    def demonstration_segments(self, task: Task) -> list[tuple[str, bool]]:
        """``task``'s demonstrated episode as ``(text, is_env)`` pairs that concatenate to ``task.prompt +
        task.demonstration``: env text (the prompt, tool replies) is context, never a behaviour-cloning target.
        One turn: the prompt, then the demonstration."""
        return [(task.prompt, True), (task.demonstration, False)]

    # ---- dataset mode ----
    def split_size(self, split: str) -> int:
        """Number of problems of ``split`` in dataset mode."""
        n_test = max(1, round(self.dataset_size * self.test_fraction))
        return n_test if check_split(split) == "test" else self.dataset_size - n_test

    def tasks(self, split: str = "train", n: int | None = None, at_most: bool = False) -> list[Task]:
        """The first ``n`` distinct problems of ``split`` (default: the split's dataset-mode size).

        Items are ``task(i, split)`` for ``i = 0, 1, ...``, skipping repeats of a canonical problem, so
        ``tasks(s, n)`` is a prefix of ``tasks(s, m)`` for ``n < m``. Raises ValueError if the problem space of
        the split is too small to hold ``n`` distinct problems; ``at_most=True`` returns the ones found instead,
        once ``1000 + 20·found`` draws in a row brought no new problem (e.g. a one-digit curriculum level).
        """
        split = check_split(split)
        n = self.split_size(split) if n is None else int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        cached = self._datasets.get(split, [])
        if len(cached) >= n:
            return cached[:n]
        out, seen = [], set()
        index, max_index, last_new = 0, 50 * n + 1000, 0
        while len(out) < n:
            if at_most and index - last_new > 1000 + 20 * len(out):
                return out
            if index >= max_index:
                raise ValueError(
                    f"only {len(out)} distinct {split} problems found in {max_index} draws; "
                    f"the problem space is too small for n={n} (raise the difficulty or lower n)"
                )
            task = self.task(index, split)
            key = self.problem_key(task)
            if key not in seen:
                seen.add(key)
                out.append(task)
                last_new = index
            index += 1
        self._datasets[split] = out
        return out

    # ---- scoring ----
    def score(self, completion: Any, answer: str) -> float:
        """Verifier reward in [0, 1]; never raises."""
        return self.check(completion, answer).reward

    # ---- gymnasium API ----
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        """New episode. ``options={"index": i, "split": s}`` pins the task (e.g. for GRPO groups); ``options``
        must be None or a dict with only the keys of ``self.reset_options`` (ValueError otherwise)."""
        if options is None:
            options = {}
        elif not isinstance(options, dict):
            raise ValueError(f"options must be None or a dict like {{'index': 0, 'split': 'test'}}, "
                             f"got {type(options).__name__}: {options!r}")
        unknown = sorted(map(str, set(options) - set(self.reset_options)))
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; known: {list(self.reset_options)}")
        super().reset(seed=seed)
        task = self.episode_task(options)
        self._task, self._done, self._last_completion = task, False, None
        info = {
            "answer": task.answer,
            "demonstration": task.demonstration,
            "task_id": task.task_id,
            "family": task.family,
            "meta": dict(task.meta),  # a copy: tasks may be cached, infos must not share objects
        }
        return task.prompt, info

    def episode_task(self, options: dict, source: TextTaskEnv | None = None) -> Task:
        """The task of a new episode: ``options["index"]``/``["split"]`` pin it, else it is drawn with
        ``self.np_random``; tasks come from ``source`` (default ``self``; e.g. the same env at another difficulty)."""
        source = self if source is None else source
        split = check_split(options.get("split", self.split))
        index = options.get("index")
        if index is None:
            if source.mode == "dataset":
                dataset = source.tasks(split)
                return dataset[int(self.np_random.integers(len(dataset)))]
            return source.task(int(self.np_random.integers(2**31)), split)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"options['index'] must be a non-negative int, got {index!r}")
        return source.task(int(index), split)

    def step(self, action: Any) -> tuple[str, float, bool, bool, dict]:
        """Score ``action`` (the completion) and terminate: ``("", reward, True, False, info)``."""
        task = self._task
        if task is None:
            raise ResetNeeded("Cannot call env.step() before calling env.reset()")
        if self._done:
            info = {"answer": task.answer, "parsed": None, "correct": False, "format_ok": False,
                    "error": "episode already terminated; call reset()", "task_id": task.task_id}
            return "", 0.0, True, False, info
        self._done, self._last_completion = True, action
        v = self.check(action, task.answer)
        info = {"answer": task.answer, "parsed": v.parsed, "correct": v.correct, "format_ok": v.format_ok,
                "error": v.error, "task_id": task.task_id}
        return "", v.reward, True, False, info

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self._task is None:
            return None
        completion = self._last_completion if isinstance(self._last_completion, str) else ""
        return self._task.prompt + completion


class Uniforms:
    """The uniform [0, 1) draws of one item, a pure function of ``(base_seed, stream, index)``.

    The draws hash ``entropy = base_seed * 2**64 + stream * 2**32 + index`` (a bijection for ``stream, index <
    2**32``) with numpy's ``SeedSequence``, the hash that ``np.random.default_rng`` seeds from. The first 12 draws
    are the words of ``SeedSequence(entropy).generate_state(12)`` / 2**32, read directly because building a full
    Generator per item costs about twice as much (see experiments/bench/env_throughput.py); later draws come
    from ``default_rng(SeedSequence(entropy).spawn(1)[0])``. Items with different ``(base_seed, stream, index)``
    are statistically independent, unlike ``seed + index`` schemes (where seed s+1 is seed s shifted by one).
    """

    __slots__ = ("seq", "buf", "pos", "rng")

    def __init__(self, base_seed: int, stream: int, index: int):
        if not (0 <= stream < 2**32 and 0 <= index < 2**32 and base_seed >= 0):
            raise ValueError(f"need base_seed >= 0 and 0 <= stream, index < 2**32; got {base_seed}, {stream}, {index}")
        # one int instead of a tuple: same SeedSequence hash of the words, 3 us cheaper to coerce
        self.seq = np.random.SeedSequence((base_seed << 64) | (stream << 32) | index)
        self.buf = [w * 2.3283064365386963e-10 for w in self.seq.generate_state(12).tolist()]
        self.pos, self.rng = 0, None

    def u(self) -> float:
        if self.pos == len(self.buf):
            if self.rng is None:
                self.rng = np.random.default_rng(self.seq.spawn(1)[0])
            self.buf, self.pos = self.rng.random(32).tolist(), 0
        self.pos += 1
        return self.buf[self.pos - 1]

    def int(self, lo: int, hi: int) -> int:
        """Uniform on {lo, ..., hi}."""
        return lo + int(self.u() * (hi - lo + 1))

    def pick(self, seq):
        return seq[int(self.u() * len(seq))]


class ProceduralTaskEnv(TextTaskEnv):
    """A TextTaskEnv whose tasks are generated: subclasses implement :meth:`draw` and :meth:`build`.

    ``task(index, split)`` makes ``r = Uniforms(base_seed, split_id, index)`` and calls ``draw(r)`` until the
    drawn problem's split key (:meth:`split_key_of`) falls in ``split`` under :func:`split_of` (rejection sampling
    keeps the split partition exact; the expected number of draws is 1 / share of the split).
    """

    family = "task"

    def draw(self, r: Uniforms) -> tuple[str, dict]:
        """One random problem: (canonical key, fields for :meth:`build`)."""
        raise NotImplementedError

    def build(self, key: str, fields: dict, task_id: str) -> Task:
        raise NotImplementedError

    def split_key_of(self, key: str, fields: dict) -> str:
        """Split key of a drawn problem (default: its key); :meth:`build` stores it as ``meta["split_key"]``
        when it differs."""
        return key

    def task(self, index: int, split: str | None = None) -> Task:
        split = check_split(self.split if split is None else split)
        r = Uniforms(self.base_seed, SPLITS[split], int(index))
        for _ in range(10_000):
            key, fields = self.draw(r)
            if split_of(self.split_key_of(key, fields), self.test_fraction) == split:
                return self.build(key, fields, f"{self.family}/{split}/{index}")
        raise RuntimeError(f"no {split} problem found in 10000 draws; test_fraction={self.test_fraction} too extreme")

    def problem_key(self, task: Task) -> str:
        return task.meta["key"]

    def split_key(self, task: Task) -> str:
        return task.meta.get("split_key", task.meta["key"])

"""Alpaca-format instruction data (``instruction``, ``input``, ``output``) -> ``AlpacaSFT-v0``.

NOT EXACTLY VERIFIABLE: the reward is a soft similarity, token-F1 of the response against the reference output
(:func:`envs.verify.token_f1`: bag of lower-cased alphanumeric words, F1 = 2PR/(P+R)). Use this env for SFT and
for a rough eval signal; do not read its reward as accuracy. ``AlpacaEnv.verifiable`` is False.

Data: a local JSON list (the original ``alpaca_data.json`` with 52k records works) or JSONL file. By default the
project's own small hand-written sample ``envs/data/alpaca_sample.jsonl`` (60 records) is used. Nothing is
downloaded. Records with the same (instruction, input) are kept once (first wins).

Prompt (the ``### Response:`` line is the marker; the completion is the response)::

    ### Instruction:
    Give the opposite of the word.
    ### Input:
    hot
    ### Response:

The ``### Input:`` block is omitted when the input is empty. The demonstration is the reference output.
Split: the same hash partition of the problem space as the procedural envs (key = instruction + input).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from envs.core import CHARSET, Task, TextTaskEnv, check_split, split_of
from envs.verify import MAX_COMPLETION_CHARS, Verdict, check_soft

SAMPLE_PATH = Path(__file__).parent / "data" / "alpaca_sample.jsonl"
RESPONSE_MARKER = "### Response:"


def load_alpaca(path: str | Path) -> list[dict[str, str]]:
    """Records ``{"instruction", "input", "output"}`` from a JSON list or a JSONL file; clear errors on bad data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Alpaca data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
        where = [f"{path}[{i}]" for i in range(len(rows))]
    else:
        lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
        rows, where = [], []
        for i, line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
            where.append(f"{path}:{i}")
    records = []
    for row, loc in zip(rows, where):
        if not isinstance(row, dict):
            raise ValueError(f"{loc}: expected an object with instruction/input/output, got {type(row).__name__}")
        missing = [k for k in ("instruction", "output") if not isinstance(row.get(k), str)]
        if missing or not isinstance(row.get("input", ""), str):
            raise ValueError(f"{loc}: fields instruction and output (and input, if given) must be strings")
        records.append({"instruction": row["instruction"], "input": row.get("input", ""), "output": row["output"]})
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def alpaca_prompt(instruction: str, input: str = "") -> str:
    body = f"### Instruction:\n{instruction.strip()}\n"
    if input.strip():
        body += f"### Input:\n{input.strip()}\n"
    return body + RESPONSE_MARKER + "\n"


class AlpacaEnv(TextTaskEnv):
    """Alpaca-format SFT data with a soft token-F1 reward (``AlpacaSFT-v0``); NOT exactly verifiable.

    ## Arguments
    ``path``: JSON/JSONL file (default: the shipped sample); ``max_chars``: drop records whose prompt + output is
    longer (None keeps all); plus the :class:`~envs.core.TextTaskEnv` arguments (``mode`` and ``dataset_size`` do
    not apply: the data is finite and ``reset`` always samples from the split's records).

    ## Version History
    * v0: initial version.
    """

    family = "alpaca"
    verifiable = False

    def __init__(self, *, path: str | None = None, max_chars: int | None = None, **kwargs: Any):
        records = load_alpaca(SAMPLE_PATH if path is None else path)
        splits: dict[str, list[Task]] = {"train": [], "test": []}
        test_fraction = kwargs.get("test_fraction", 0.1)
        seen, chars = set(), set(CHARSET)
        for rec in records:
            key = rec["instruction"].strip() + "\n" + rec["input"].strip()
            prompt, output = alpaca_prompt(rec["instruction"], rec["input"]), rec["output"].strip()
            if key in seen or (max_chars is not None and len(prompt) + len(output) > max_chars):
                continue
            seen.add(key)
            split = split_of(key, test_fraction)
            tasks = splits[split]
            tasks.append(Task(prompt, output, output, f"alpaca/{split}/{len(tasks)}", "alpaca", {"key": key}))
            chars.update(prompt, output)
        for split, tasks in splits.items():
            if not tasks:
                raise ValueError(f"the {split} split of the Alpaca data is empty ({len(seen)} usable records)")
        self.max_prompt_chars = max(len(t.prompt) for ts in splits.values() for t in ts)
        longest_output = max(len(t.answer) for ts in splits.values() for t in ts)
        kwargs.setdefault("max_completion_chars", max(MAX_COMPLETION_CHARS, 2 * longest_output))  # demos must fit
        super().__init__(charset="".join(sorted(chars)), **kwargs)
        self._datasets = splits
        self.mode = "dataset"

    def task(self, index: int, split: str | None = None) -> Task:
        tasks = self._datasets[check_split(self.split if split is None else split)]
        if not 0 <= index < len(tasks):
            raise ValueError(f"index {index} out of range: the {split or self.split} split has {len(tasks)} records")
        return tasks[index]

    def split_size(self, split: str) -> int:
        return len(self._datasets[check_split(split)])

    def tasks(self, split: str = "train", n: int | None = None, at_most: bool = False) -> list[Task]:
        """The first ``n`` records of ``split`` (all by default); more than it holds is an error unless ``at_most``."""
        tasks = self._datasets[check_split(split)]
        if n is not None and not 0 <= n <= len(tasks) and not (at_most and n > 0):
            raise ValueError(f"n={n} but the {split} split has {len(tasks)} records")
        return tasks[:n]

    def format_answer(self, answer: str) -> str:
        return answer

    def check(self, completion, answer) -> Verdict:
        return check_soft(completion, answer, RESPONSE_MARKER, self.max_completion_chars)

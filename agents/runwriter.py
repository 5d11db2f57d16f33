"""RunWriter: the one writer of a run directory's record files, for every kind of run (LM post-training, Cohen's).

    config.json     {"config": {...}, "git_hash": str, "argv": [...], "resumed": [...]}
    metrics.jsonl   one JSON object per logged step, {"step": int, "namespace/name": number | null, ...}
    status.json     {"status": "running" | "completed" | "diverged" | "failed", "step": int, "reason": str}
    DONE            written when the run ended (completed or diverged); holds status.json's text

Every file is replaced atomically (tmp file + ``os.replace``) except metrics.jsonl, which grows one line per row, so
a crash can leave at most a torn last line. NaN and ±inf are written as null (strict JSON has neither).
``experiments.rundirs`` reads this layout; checkpoints are the trainer's own business.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

STATUS_RUNNING, STATUS_COMPLETED, STATUS_DIVERGED, STATUS_FAILED = "running", "completed", "diverged", "failed"
CONFIG, METRICS, STATUS, DONE = "config.json", "metrics.jsonl", "status.json", "DONE"


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (tmp file + os.replace), so readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def git_hash() -> str:
    """HEAD of the repository holding this code, or "unknown" (not a checkout, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent.parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def finite_or_none(x: Any) -> Any:
    """A metric value as JSON holds it: 0-d tensors and numpy scalars as Python numbers, NaN/inf as None."""
    if hasattr(x, "item") and not isinstance(x, (int, float)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def metric_rows(path: Path) -> tuple[list[dict], list[int]]:
    """Parsed rows of a metrics.jsonl and the (1-based) numbers of the lines that are not JSON.

    Rows are appended one line at a time, so a crash can cut the last line short; a bad line elsewhere is damage."""
    rows, bad = [], []
    for i, line in enumerate(path.read_text(errors="replace").splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad.append(i + 1)
    return rows, bad


def is_wall_clock(key: str) -> bool:
    """Whether a metric measures the machine rather than the run: a wall-clock time (``time/*``, ``*seconds``) or a
    memory peak (``memory/*``): the only values that differ between two runs that are otherwise bitwise identical
    (a resumed run and its uninterrupted twin)."""
    return key.startswith(("time/", "memory/")) or key.endswith("seconds")


def read_metrics(run_dir: Path | str, wall_clock: bool = True) -> list[dict]:
    """Rows of metrics.jsonl (empty list when absent); lines that are not JSON (a torn last line) are left out.
    ``wall_clock=False`` drops the wall-clock keys (``is_wall_clock``), to compare two runs value for value."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rows = metric_rows(path)[0]
    return rows if wall_clock else [{k: v for k, v in r.items() if not is_wall_clock(k)} for r in rows]


class RunWriter:
    """Writes ``run_dir``'s config.json, metrics.jsonl, status.json and DONE (layout in the module docstring).

    ``log_fn`` (e.g. a wandb logger) receives every row after it is written."""

    def __init__(self, run_dir: Path | str, log_fn: Callable[[dict], None] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.log_fn = log_fn
        self.run_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ config.json
    def saved_config(self) -> dict | None:
        """config.json as written (None when absent); raises the JSON / OS error when it cannot be read."""
        path = self.run_dir / CONFIG
        return json.loads(path.read_text()) if path.exists() else None

    def write_config(self, config: dict, resumed: list[dict] = ()) -> None:
        """config.json: the resolved config with the code's git hash, this process's argv and the resume history."""
        write_json(self.run_dir / CONFIG, {"config": config, "git_hash": git_hash(), "argv": sys.argv,
                                           "resumed": list(resumed)})

    # ------------------------------------------------------------------ metrics.jsonl
    def rows(self) -> tuple[list[dict], list[int]]:
        """(rows, numbers of lines that are not JSON); ([], []) when there is no metrics.jsonl yet."""
        path = self.run_dir / METRICS
        return metric_rows(path) if path.exists() else ([], [])

    def line_count(self) -> int:
        path = self.run_dir / METRICS
        return len(path.read_text(errors="replace").splitlines()) if path.exists() else 0

    def replace_rows(self, rows: list[dict]) -> None:
        """Replace metrics.jsonl atomically (a crash leaves the old or the new file, never a half-written one)."""
        tmp = self.run_dir / (METRICS + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.run_dir / METRICS)

    def keep_rows_before(self, step: int) -> None:
        """Drop the rows logged at ``step`` or later (a resume from ``step`` recomputes them identically)."""
        if (self.run_dir / METRICS).exists():
            self.replace_rows([r for r in read_metrics(self.run_dir) if r["step"] < step] if step > 0 else [])

    def append(self, row: dict) -> None:
        """Append one row (flushed at once, so a reader or a crash sees whole rows), then hand it to ``log_fn``."""
        row = {k: finite_or_none(v) for k, v in row.items()}
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.log_fn is not None:
            self.log_fn(row)

    # ------------------------------------------------------------------ status.json / DONE
    def status_step(self) -> int:
        """The step status.json reports (0 when there is none): the run got that far, whatever happens next."""
        try:
            return int(json.loads((self.run_dir / STATUS).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def write_status(self, status: str, step: int, reason: str = "") -> None:
        write_json(self.run_dir / STATUS, {"status": status, "step": step, "reason": reason})

    def finish(self, status: str, step: int, reason: str = "") -> None:
        """The run ended (``STATUS_COMPLETED`` or ``STATUS_DIVERGED``): status.json, then DONE with its text."""
        self.write_status(status, step, reason)
        (self.run_dir / DONE).write_text((self.run_dir / STATUS).read_text())

    @property
    def done(self) -> bool:
        return (self.run_dir / DONE).exists()

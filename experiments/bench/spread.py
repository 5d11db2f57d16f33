"""Summaries of repeated, interleaved timings for the benchmarks: the median with the spread (min–max) over repeats,
paired ratios (repeat r of A over repeat r of B, so a slow patch of a shared machine hits both sides of a ratio), and
the A B B A / round-robin orders the benchmarks run their peers in."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Spread:
    median: float
    lo: float
    hi: float
    n: int

    def fmt(self, spec: str = ".2f", unit: str = "") -> str:
        """``"1.23x [1.10–1.40] (n=4)"``; one repeat prints no range."""
        if self.n == 0:
            return "n/a"
        mid = f"{self.median:{spec}}{unit}"
        return mid if self.n == 1 else f"{mid} [{self.lo:{spec}}–{self.hi:{spec}}] (n={self.n})"


def spread(xs: Sequence[float]) -> Spread:
    """Median, min and max of ``xs`` (NaN for none)."""
    xs = [float(x) for x in xs]
    if not xs:
        return Spread(math.nan, math.nan, math.nan, 0)
    return Spread(statistics.median(xs), min(xs), max(xs), len(xs))


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> Spread:
    """Spread of num[r] / den[r] over the repeats r (each pair measured side by side)."""
    if len(num) != len(den):
        raise ValueError(f"unpaired: {len(num)} vs {len(den)} repeats")
    return spread([a / b for a, b in zip(num, den)])


def abba(names: Sequence[str], rounds: int) -> list[str]:
    """Round-robin order of ``rounds`` rounds, every odd round reversed (A B, B A, A B, ...), so each peer runs
    first and last equally often and a linear drift of the machine's speed cancels in the paired ratios."""
    out: list[str] = []
    for r in range(rounds):
        out.extend(names if r % 2 == 0 else list(reversed(names)))
    return out

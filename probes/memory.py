"""Peak memory of a block of code: ``with PeakMemory(device) as m: ...`` then ``m.mb`` (MB above the block's entry)
and ``m.peak_mb`` (MB at the peak, absolute).

- CUDA device: the caching allocator's counters, ``max_memory_allocated`` after ``reset_peak_memory_stats`` at entry
  (tensor bytes, exact; the allocator's reserved-but-free cache is not counted).
- CPU on Linux: the process's resident set, VmHWM after resetting it through ``/proc/self/clear_refs`` ("5") at
  entry, minus VmRSS at entry. Memory that the C allocator kept resident from earlier frees is reused without
  raising the resident set, so ``mb`` is a lower bound of the block's allocations unless large frees go back to the
  OS (glibc's mmap threshold pinned low, as experiments/bench/scale.py does with ``pin_mmap_threshold``).
- anything else: NaN.
Cost: two reads of /proc/self/status and one write (≈ 50 µs), or two CUDA counter calls.
"""
from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

__all__ = ["PeakMemory", "pin_mmap_threshold"]

_STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")
MB = 2 ** 20


def _status_kb(*keys: str) -> tuple[int, ...]:
    values = {}
    with open(_STATUS) as f:
        for line in f:
            name = line.split(":", 1)[0]
            if name in keys:
                values[name] = int(line.split()[1])
    return tuple(values[k] for k in keys)


def _cpu_supported() -> bool:
    try:
        _status_kb("VmRSS", "VmHWM")
        with open(_CLEAR, "w") as f:
            f.write("5")
        return True
    except (OSError, KeyError, ValueError):
        return False


_CPU = None  # whether /proc supports the reset; probed once


def pin_mmap_threshold(nbytes: int = 64 * 1024) -> bool:
    """Make glibc serve every allocation above ``nbytes`` by mmap and unmap it on free (M_MMAP_THRESHOLD), so that
    freed tensors leave the resident set and a later peak is measured above a true baseline. False where there is
    no glibc ``mallopt``."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes)))
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Context manager measuring the peak memory of its block on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.mb = math.nan  # peak above the entry level, MB
        self.peak_mb = math.nan  # peak, MB (process resident set on CPU; allocated tensor bytes on CUDA)
        self._entry = 0

    def __enter__(self) -> "PeakMemory":
        global _CPU
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._entry = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            if _CPU is None:
                _CPU = _cpu_supported()
            if _CPU:
                with open(_CLEAR, "w") as f:
                    f.write("5")
                self._entry = _status_kb("VmRSS")[0] * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.device.type == "cpu" and _CPU:
            peak = _status_kb("VmHWM")[0] * 1024
        else:
            return
        self.peak_mb = peak / MB
        self.mb = max(0, peak - self._entry) / MB

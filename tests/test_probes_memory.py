"""PeakMemory against allocations of known size: a 200 MB tensor inside the block reads ≈ 200 MB above entry on the
CPU (resident set, glibc's mmap threshold pinned so frees leave it), an empty block ≈ 0."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probes.memory import PeakMemory


CPU_CHECK = """
import torch
from probes.memory import PeakMemory, pin_mmap_threshold
assert pin_mmap_threshold()
with PeakMemory("cpu") as big:
    x = torch.ones(50 * 2 ** 20, dtype=torch.float32)  # 200 MB, touched
    del x
with PeakMemory("cpu") as empty:
    y = torch.ones(1000)
    del y
print(big.mb, empty.mb, big.peak_mb)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU reading is the Linux resident set")
def test_cpu_peak_of_a_known_allocation():
    # a fresh interpreter: a long-lived test worker's allocator history (what earlier tests left resident) is not
    # part of what is measured here
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", CPU_CHECK], capture_output=True, text=True, timeout=120, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    big, empty, peak = map(float, out.stdout.split())
    assert 195 <= big <= 260, big
    assert empty < 20, empty
    assert peak >= big


def test_unsupported_device_reads_nan():
    with PeakMemory("meta") as m:
        pass
    assert math.isnan(m.mb) and math.isnan(m.peak_mb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_of_a_known_allocation():
    with PeakMemory("cuda") as m:
        x = torch.ones(50 * 2 ** 20, device="cuda")
        del x
    assert 199 <= m.mb <= 201

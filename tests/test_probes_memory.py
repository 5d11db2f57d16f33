"""PeakMemory against allocations of known size: a 200 MB tensor inside the block reads ≈ 200 MB above entry on the
CPU (resident set, glibc's mmap threshold pinned so frees leave it), an empty block ≈ 0."""
import math
import sys

import pytest
import torch

from probes.memory import PeakMemory, pin_mmap_threshold


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU reading is the Linux resident set")
def test_cpu_peak_of_a_known_allocation():
    assert pin_mmap_threshold()
    with PeakMemory("cpu") as big:
        x = torch.ones(50 * 2 ** 20)  # 200 MB, touched
        del x
    with PeakMemory("cpu") as empty:
        y = torch.ones(1000)
        del y
    assert 195 <= big.mb <= 260, big.mb
    assert empty.mb < 20, empty.mb
    assert big.peak_mb >= big.mb and math.isfinite(empty.peak_mb)


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

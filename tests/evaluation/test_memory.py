"""evaluation.memory.PeakMemory: the peak of one block, not the process's lifetime mark."""
import time

import torch

from leakbench.evaluation.memory import MIB, PeakMemory, lifetime_peak_bytes, rss_bytes

BIG = 200  # MiB


def _big_block() -> None:
    """~200 MiB resident for a moment, then freed (torch returns a block this large to the system)."""
    block = torch.ones(BIG * MIB // 4)  # float32, every page written
    time.sleep(0.1)  # several sampling intervals
    del block


def test_a_small_block_after_a_big_one_reports_a_small_peak():
    assert rss_bytes() is not None  # /proc/self/statm on Linux
    with PeakMemory() as big:
        _big_block()
    after_big = lifetime_peak_bytes() / MIB
    with PeakMemory() as small:
        torch.ones(1024).sum()
    lifetime = lifetime_peak_bytes() / MIB  # what ru_maxrss (the old peak_rss_mb) reports for the small block

    def much_lower(first: float, second: float) -> bool:
        return second < first - BIG / 2

    assert big.rise_mb > BIG * 0.9 and small.rise_mb < BIG / 10
    assert much_lower(big.peak_rss_mb, small.peak_rss_mb)
    # the flaw this test exists for, injected: the lifetime mark says the small block peaked as high as the big one
    assert not much_lower(after_big, lifetime)
    assert big.peak_cuda_mb is None or big.peak_cuda_mb >= 0  # only on CUDA (no GPU here: untested)

"""A freed host tensor of 256 KiB or more goes back to the OS (train/engine.py release_freed_host_memory), even
when smaller tensors that stay were allocated between: ZeRO-3's partitions and gathered blocks interleave like
that, and glibc's heap kept what they freed (about 300 MiB a rank of a 0.28B model on 2 CPU ranks at a 4 MiB
threshold, 2.5 GB at glibc's own moving one: benchmarks/start_memory.py). Each case runs in its own process, since
the threshold is the process's."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROGRAM = """
import sys, torch
import train.engine as engine
if len(sys.argv) > 1:
    engine.HOST_MMAP_THRESHOLD = int(sys.argv[1])
assert engine.release_freed_host_memory(), "this C library has no mallopt"
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20
before = rss()
freed, kept = [], []
for _ in range(300):  # 1 MiB each, with an 8 KiB tensor that stays after each
    freed.append(torch.ones(1 << 18))
    kept.append(torch.ones(2048))
del freed
print(rss() - before)
"""


def retained_mib(*threshold: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROGRAM, *threshold], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return float(out.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux's")
def test_freed_mid_sized_tensors_leave_the_process_between_ones_that_stay():
    assert retained_mib() < 60  # 300 MiB were allocated; the kept tensors are 2.4 MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux's")
def test_golden_at_the_old_4_mib_threshold_the_heap_keeps_them():
    assert retained_mib(str(4 << 20)) > 250

"""bench.memory.AllocatedPeak: the peak of torch's CPU allocator bytes in a block, read from the
profiler's memory events, without the profiler's C++ start/stop lines on stderr."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = r"""
import json, os, sys
import torch
from dist_train.bench.memory import AllocatedPeak
keep = torch.zeros(1 << 18)  # allocated before: not counted
with AllocatedPeak() as mem:
    a = torch.ones(1 << 20)   # 4 MiB
    b = torch.ones(1 << 19)   # 2 MiB, while a is live: the peak is 6 MiB
    del a, b
    c = torch.ones(1 << 18)   # 1 MiB after the frees: below the peak
os.write(2, b"stderr still open\n")
print(json.dumps({"peak": mem.peak}))
"""


def test_allocated_peak_counts_live_tensor_bytes_and_keeps_stderr_quiet():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    assert (6 << 20) <= peak < (6 << 20) + (64 << 10)  # 6 MiB, plus at most a few small temporaries
    # kineto's "USDT: ... profiler_start/stop" lines are gone; fd 2 works again after the block
    assert "USDT" not in out.stderr and "profiler_start" not in out.stderr
    assert "stderr still open" in out.stderr

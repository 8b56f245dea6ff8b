"""Process-memory probes for benchmarks on Linux: peak resident set that can be reset, and the
live malloc heap (free of what the allocator keeps resident after frees).

`ru_maxrss` cannot be reset and is mostly interpreter and torch for small models, so comparisons
of it sit near 1 whatever the method; these probes measure what a method adds.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import Iterator, Optional


def status_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    hwm = status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    from dist_train.telemetry import peak_memory_bytes

    return int(peak_memory_bytes("cpu") or 0)


def reset_peak_rss() -> tuple[int, bool]:
    """Free what can be freed, restart the peak-RSS counter; returns (current RSS, reset worked)."""
    gc.collect()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    ok = False
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as fh:  # "5": reset the peak RSS (Linux >= 4.0)
            fh.write("5")
        ok = True
    return int(status_bytes("VmRSS") or peak_rss()), ok


_MALLINFO2 = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
              "keepcost")


def mallinfo2() -> Optional[dict[str, int]]:
    """glibc's heap accounting (mallinfo2(3)) as a dict, or None off glibc."""
    try:
        import ctypes

        class _MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in _MALLINFO2]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
        return {n: int(getattr(info, n)) for n in _MALLINFO2}
    except (OSError, AttributeError):
        return None


def live_heap_bytes() -> Optional[int]:
    """Bytes glibc's malloc has handed out and not taken back (mallinfo2: uordblks + hblkhd):
    live allocations only, without the freed memory the allocator keeps resident."""
    info = mallinfo2()
    return None if info is None else info["uordblks"] + info["hblkhd"]


def live_heap_mode():
    """A dispatch mode that samples the live heap after every aten op (forward, backward and
    optimizer alike) and keeps the maximum. It slows a step by about a third, so it runs in its
    own short pass, never in a timed run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LiveHeapPeak(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.base = self.peak = live_heap_bytes() or 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            now = live_heap_bytes() or 0
            if now > self.peak:
                self.peak = now
            return out

    return LiveHeapPeak()


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block. torch 2.13's kineto writes a `USDT: ...
    profiler_start` / `profiler_stop` line to stderr from C++ at every profiler start and stop
    (kineto PR #1325), whatever KINETO_LOG_LEVEL says; a benchmark that profiles dozens of runs
    would print a page of them. Python exceptions still propagate: only the C++ writes are lost."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class AllocatedPeak:
    """Peak of the tensor bytes torch's CPU allocator has handed out inside the `with` block, over
    what was allocated on entry: on CPU, what `torch.cuda.max_memory_allocated` counts on GPU.

    It reads the allocator's own events (torch.profiler with `profile_memory`: every allocation and
    free, intra-op temporaries included), so unlike the resident set it does not depend on what
    malloc keeps or returns, and the same steps give the same figure on every run. The profiler
    slows ops, so it belongs in an untimed pass. `peak` (bytes) is set on exit."""

    def __init__(self) -> None:
        self.peak: Optional[int] = None
        self._prof = None

    def __enter__(self) -> "AllocatedPeak":
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _stderr_to_devnull():
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        with _stderr_to_devnull():
            self._prof.__exit__(*exc)
        # "[memory]" events carry the signed size of one allocation (+) or free (-), in time order
        events = sorted((e.start_ns(), e.nbytes()) for e in self._prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type().name == "CPU")
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        self.peak = peak

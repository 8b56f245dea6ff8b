"""runtime.cpu_malloc: "cache" keeps a step's freed blocks in the heap for the next one; "system"
leaves glibc as it is. Each case runs in a fresh interpreter (mallopt is process-wide and cannot be
undone), and reads glibc's own accounting (mallinfo2): `hblkhd` is the bytes held in mmap'ed blocks,
`fordblks` the free bytes the heap keeps."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from dist_train.config import load_config
from dist_train.runtime.malloc import configure_cpu_malloc

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

PROBE = r"""
import ctypes, json, sys
import torch
from dist_train.bench.memory import mallinfo2
from dist_train.runtime.malloc import configure_cpu_malloc
ok = configure_cpu_malloc(sys.argv[1])
x = torch.ones(4 << 20)  # 16 MiB: above glibc's default mmap threshold (128 KiB, dynamic up to 32 MiB)
held = mallinfo2()
del x
freed = mallinfo2()
print(json.dumps({"ok": ok, "mmapped_live": held["hblkhd"], "kept_after_free": freed["fordblks"]}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_serves_large_blocks_from_the_heap_and_keeps_them():
    cache, system = _probe("cache"), _probe("system")
    assert cache["ok"] and system["ok"]
    # glibc's default maps the 16 MiB block and unmaps it at free; "cache" takes it from the heap ...
    assert system["mmapped_live"] >= 16 << 20 and cache["mmapped_live"] < 16 << 20
    # ... and keeps it there once freed, for the next step to reuse without faulting pages in.
    assert cache["kept_after_free"] >= 16 << 20 and system["kept_after_free"] < 16 << 20


def test_config_default_and_bad_value():
    assert load_config(None, []).runtime.cpu_malloc == "cache"
    with pytest.raises(Exception, match="cpu_malloc"):
        load_config(None, ["runtime.cpu_malloc=jemalloc"])
    with pytest.raises(ValueError, match="unknown mode"):
        configure_cpu_malloc("jemalloc")  # type: ignore[arg-type]

"""Throughput read back from a run's own metrics.jsonl: the benchmarks time training by the windows
the trainer logged, not by a clock of their own around it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple


class Windows(NamedTuple):
    records: list[dict]  # the logged rows that carry samples/s, by step
    wall_s: float  # summed time of the windows after the warm-up
    samples: int  # examples trained in them
    idle_s: float  # time-weighted idle (a pipeline stage waiting on its link)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; none if the run did not write one."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def after_warmup(records: list[dict], warmup: int, batch: int) -> Windows:
    """The windows that end after step `warmup`. A window of s steps took s x batch / its samples/s
    seconds; summing times (not averaging rates) weighs each window by its length."""
    recs = sorted((r for r in records if "samples_per_s" in r), key=lambda r: r["step"])
    prev, wall, samples, idle = 0, 0.0, 0, 0.0
    for r in recs:
        steps = r["step"] - prev
        if r["step"] > warmup:
            elapsed = steps * batch / r["samples_per_s"]
            wall += elapsed
            samples += steps * batch
            idle += r.get("idle_fraction", 0.0) * elapsed
        prev = r["step"]
    return Windows(recs, wall, samples, idle)

"""The run's top-level metrics for a pipeline: every stage's logged figures, gathered on one rank.

Each stage logs its own record (`stages/stage<k>/`). The run's `metrics.jsonl` and TensorBoard need
one row per logged step with the task loss (the last stage's), every stage's loss, throughput,
memory and energy. A collective at every log step would make the stages wait for each other (the
last stage runs behind the first), so instead each stage's lead rank sends its figures, a few floats,
with a non-blocking send to the last stage's lead, which writes the row when it logs the same step:
by then the earlier stages have long sent theirs, so nothing waits.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from dist_train.local.link import STATS_TAG
from dist_train.telemetry.energy_log import derived

# What each stage reports for the top-level row (NaN travels for "unknown").
FIELDS = ("loss", "samples_per_s", "idle_fraction", "data_wait_s", "data_wait_frac", "peak_mem_bytes", "energy_j", "power_w", "energy_j_counted",
          "power_w_counted", "bytes_sent", "gpu_util_pct", "gpu_mem_used_bytes", "gpu_temp_c")


def _pack(record: dict, device: torch.device) -> torch.Tensor:
    vals = [record.get(k) for k in FIELDS]
    return torch.tensor([math.nan if v is None else float(v) for v in vals], dtype=torch.float64, device=device)


def _unpack(t: torch.Tensor) -> dict:
    return {k: (None if math.isnan(v) else v) for k, v in zip(FIELDS, t.cpu().tolist())}


class StageStats:
    def __init__(self, layout, device: torch.device, distributed: bool):
        self.layout, self.device, self.distributed = layout, device, distributed
        self.collector = (layout.num_stages - 1) * layout.dp_size  # lead rank of the last stage
        self._out: list = []

    def send(self, record: dict) -> None:
        """A non-last stage's lead: hand this log step's figures to the collector (no wait)."""
        if self.layout.lead and not self.layout.last and self.distributed:
            buf = _pack(record, self.device)
            self._out.append((dist.isend(buf, self.collector, tag=STATS_TAG), buf))

    def gather(self, record: dict) -> list[dict]:
        """The collector: every stage's figures for this log step, in stage order (its own last)."""
        rows = []
        for k in range(self.layout.num_stages - 1):
            buf = torch.empty(len(FIELDS), dtype=torch.float64, device=self.device)
            dist.recv(buf, k * self.layout.dp_size, tag=STATS_TAG)
            rows.append(_unpack(buf))
        rows.append({k: record.get(k) for k in FIELDS})
        return rows

    def drain(self) -> None:
        for work, _ in self._out:
            work.wait()
        self._out.clear()


def top_level_row(step: int, lr: float, rows: list[dict], steps: int, batch_size: int, tokens_per_sample: int,
                  source: Optional[str], extra: dict) -> dict:
    """The run's row for a window of `steps` steps of `batch_size`: the task loss is the last stage's; throughput
    is the slowest stage's; memory and the data wait (per step, and its share of the stage's step) the
    largest stage's; energy and power the sum over the job, each device counted once (every stage trains
    every example, so J/sample is the job's energy / samples); GPU utilisation the mean over the stages,
    GPU memory and temperature the largest (None without NVML)."""
    rate = min(r["samples_per_s"] for r in rows)
    energy = [r["energy_j_counted"] for r in rows]
    power = [r["power_w_counted"] for r in rows]
    row = {"step": step, "loss": rows[-1]["loss"], "lr": lr,
           **{f"stage{k}_loss": r["loss"] for k, r in enumerate(rows)},
           "samples_per_s": rate, "tokens_per_s": rate * tokens_per_sample,
           "peak_mem_bytes": max(r["peak_mem_bytes"] or 0 for r in rows),
           "data_wait_s": _over_stages(rows, "data_wait_s", max),
           "data_wait_frac": _over_stages(rows, "data_wait_frac", max),
           "bytes_sent": sum(r["bytes_sent"] or 0 for r in rows),
           "energy_j": None if any(e is None for e in energy) else sum(energy),
           "power_w": None if any(p is None for p in power) else sum(power),
           "energy_source": source,
           "gpu_util_pct": _over_stages(rows, "gpu_util_pct", lambda v: sum(v) / len(v)),
           "gpu_mem_used_bytes": _over_stages(rows, "gpu_mem_used_bytes", max),
           "gpu_temp_c": _over_stages(rows, "gpu_temp_c", max)}
    row.update(derived(row["energy_j"], steps * batch_size, tokens_per_sample, steps))
    row.update({f"stage{k}_energy_j": r["energy_j"] for k, r in enumerate(rows) if r["energy_j"] is not None})
    row.update(extra)
    return row


def _over_stages(rows: list[dict], key: str, reduce) -> Optional[float]:
    """`reduce` over the stages that know `key`; None if none does."""
    known = [r[key] for r in rows if r.get(key) is not None]
    return reduce(known) if known else None

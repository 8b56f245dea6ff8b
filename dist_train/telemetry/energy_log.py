"""Energy over logging windows, for a group of ranks: the one place the training loops get their
energy, power and GPU figures from.

Every rank reads its own meter (`energy.py`) when a logging window closes. One all-gather of a few
floats per rank over the group (the world for the end-to-end loop, a stage's replicas for a
local-learning pipeline) gives every rank of the group:

* per-rank figures (`energy_rank_j`, `power_rank_w`): what each rank's meter read;
* the group's figures (`energy_j`, `power_w`): each device counted once — two ranks on one GPU (two
  pipeline stages sharing a card) or on one node's RAPL package counters count it once, by the
  first rank that reads it;
* `energy_j_counted` / `power_w_counted`: the same with "first reader" taken over the whole world,
  so a pipeline's stages can be summed into the job's total without counting a shared GPU twice;
* the derived figures: joules per sample (and per token), samples (tokens) per joule;
* GPU utilisation, memory in use and temperature where the meter is NVML.

A figure that was not measured is None (null in metrics.jsonl), never an estimate: one rank's
unknown window makes the group's sum unknown rather than silently smaller.

`EnergyTotals` keeps the run's running total on the rank that writes the metrics, and the end-of-run
summary (kWh, and CO2 only from a configured grid intensity; nothing is looked up).
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .energy import EnergyMeter

# One row of the all-gather per rank. NaN travels for "unknown".
_FIELDS = ("energy_j", "power_w", "first_in_group", "first_in_world", "gpu_util_pct", "gpu_mem_used_bytes",
           "gpu_temp_c")
JOULES_PER_KWH = 3.6e6


def derived(energy_j: Optional[float], samples: float, tokens_per_sample: int,
            steps: Optional[int] = None) -> dict[str, Optional[float]]:
    """J per step (when `steps` is given), J per sample and samples per J (and per token for language
    models) of one window."""
    known = energy_j is not None and samples > 0
    out = {} if steps is None else {"joules_per_step": energy_j / steps if energy_j is not None and steps else None}
    out |= {"joules_per_sample": energy_j / samples if known else None,
           "samples_per_j": samples / energy_j if known and energy_j > 0 else None}
    if tokens_per_sample > 1:
        tokens = samples * tokens_per_sample
        out.update({"joules_per_token": energy_j / tokens if known else None,
                    "tokens_per_j": tokens / energy_j if known and energy_j > 0 else None})
    return out


class EnergyLog:
    """One rank's share of a group's energy telemetry. Collective: every rank of the group calls
    `window` at the same logging steps (and the constructor on every rank of the world)."""

    def __init__(self, meter: EnergyMeter, rank: int = 0, world_size: int = 1,
                 group_ranks: Optional[Sequence[int]] = None, group: Any = None,
                 device: torch.device = torch.device("cpu"), host: Optional[str] = None) -> None:
        self.meter, self.rank, self.group, self.device = meter, rank, group, device
        self.group_ranks = list(group_ranks) if group_ranks is not None else list(range(world_size))
        # Which device this rank's meter reads: a GPU by its NVML UUID, or the node's RAPL counters.
        key = (host or socket.gethostname(), meter.device_key if meter.scope == "gpu" else "node")
        mine = (key, meter.source != "unavailable")
        seen = [mine]
        if world_size > 1:
            import torch.distributed as dist

            seen = [None] * world_size
            dist.all_gather_object(seen, mine)
        keys = [k for k, _ in seen]
        self.first_in_world = keys.index(key) == rank
        self.first_in_group = next(r for r in self.group_ranks if keys[r] == key) == rank
        # When no rank of the group measures anything (energy: none, or no source anywhere), a
        # window is nulls and costs no collective; otherwise every rank of the group joins it.
        self.measuring = any(seen[r][1] for r in self.group_ranks)
        self.distributed = world_size > 1 and len(self.group_ranks) > 1 and self.measuring

    @property
    def source(self) -> str:
        return self.meter.source

    @property
    def detail(self) -> str:
        return self.meter.detail

    def describe(self) -> dict[str, Any]:
        """What is measured and how, for the run's provenance and its first log line."""
        return {"source": self.meter.source, "detail": self.meter.detail, "scope": self.meter.scope}

    def start(self) -> None:
        self.meter.start()

    def close(self) -> None:
        self.meter.close()

    def window(self, samples: float, tokens_per_sample: int = 1, steps: Optional[int] = None) -> dict[str, Any]:
        """Close this rank's window and return the group's figures for it (`samples`: how many
        examples the group trained in the window's `steps` steps)."""
        e, p = self.meter.read()
        known = e is not None and p is not None
        stats = self.meter.device_stats()
        row = [e if known else math.nan, p if known else math.nan, float(self.first_in_group),
               float(self.first_in_world), *(_nan(stats.get(k)) for k in _FIELDS[4:])]
        mine = torch.tensor(row, dtype=torch.float64)
        if self.distributed:
            import torch.distributed as dist

            parts = [torch.empty_like(mine, device=self.device) for _ in self.group_ranks]
            dist.all_gather(parts, mine.to(self.device), group=self.group)
            table = torch.stack(parts).cpu()
        elif len(self.group_ranks) > 1:  # nobody measures: every rank's row is unknown
            table = torch.full((len(self.group_ranks), len(_FIELDS)), math.nan, dtype=torch.float64)
        else:
            table = mine.unsqueeze(0)
        return self._figures(table, samples, tokens_per_sample, steps)

    def _figures(self, table: torch.Tensor, samples: float, tokens_per_sample: int,
                 steps: Optional[int] = None) -> dict[str, Any]:
        unavailable = not self.measuring  # the same verdict on every rank of the group
        energy, power = table[:, 0], table[:, 1]

        def once(column: int) -> tuple[Optional[float], Optional[float]]:
            mask = table[:, column] > 0
            if unavailable or bool(torch.isnan(energy[mask]).any()):
                return None, None
            return float(energy[mask].sum()), float(power[mask].sum())

        e_group, p_group = once(2)
        e_world, p_world = once(3)
        out: dict[str, Any] = {
            "energy_j": e_group, "power_w": p_group, "energy_j_counted": e_world, "power_w_counted": p_world,
            **derived(e_group, samples, tokens_per_sample, steps),
            "energy_rank_j": [_none(v) for v in energy.tolist()],
            "power_rank_w": [_none(v) for v in power.tolist()],
            "energy_source": self.meter.source,
        }
        if self.meter.scope == "gpu":
            util, mem, temp = table[:, 4], table[:, 5], table[:, 6]
            out.update({"gpu_util_pct": _reduce(util, torch.mean), "gpu_mem_used_bytes": _reduce(mem, torch.max),
                        "gpu_temp_c": _reduce(temp, torch.max),
                        "gpu_util_rank_pct": [_none(v) for v in util.tolist()],
                        "gpu_temp_rank_c": [_none(v) for v in temp.tolist()],
                        "gpu_mem_used_rank_bytes": [_none(v) for v in mem.tolist()]})
        return out


def per_rank_scalars(row: dict[str, Any], ranks: Sequence[int]) -> dict[str, float]:
    """TensorBoard scalars for the per-rank lists of a window (metrics.jsonl keeps the lists)."""
    names = {"energy_rank_j": "energy/rank{}_j", "power_rank_w": "energy/rank{}_w",
             "gpu_util_rank_pct": "gpu/rank{}_util_pct", "gpu_temp_rank_c": "gpu/rank{}_temp_c",
             "gpu_mem_used_rank_bytes": "gpu/rank{}_mem_used_bytes"}
    out = {}
    for key, tag in names.items():
        for r, v in zip(ranks, row.get(key) or []):
            if v is not None:
                out[tag.format(r)] = v
    return out


class EnergyTotals:
    """The run's energy so far, kept by the rank that writes metrics.jsonl.

    On resume it starts from the rows already in metrics.jsonl (truncated to the resumed step), so
    the total covers the whole run as recorded: steps repeated after a failure count once, and a
    window whose energy was unknown is counted in `unknown_windows`, not guessed.
    """

    def __init__(self, grid_g_per_kwh: Optional[float] = None) -> None:
        self.grid_g_per_kwh = grid_g_per_kwh
        self.total_j, self.windows, self.unknown_windows = 0.0, 0, 0

    def resume_from(self, metrics_file: Path) -> "EnergyTotals":
        if metrics_file.exists():
            for line in metrics_file.read_text().splitlines():
                row = json.loads(line)
                if "energy_source" in row:  # a training row, not an evaluation-only one
                    self.add(row.get("energy_j"))
        return self

    def add(self, energy_j: Optional[float]) -> Optional[float]:
        """Count one window; returns the running total of the measured windows (J), None while none was."""
        self.windows += 1
        if energy_j is None:
            self.unknown_windows += 1
        else:
            self.total_j += energy_j
        return self.total_j if self.windows > self.unknown_windows else None

    def summary(self, source: str, detail: str, samples: int, tokens_per_sample: int) -> dict[str, Any]:
        measured = source != "unavailable" and self.windows > self.unknown_windows
        total = self.total_j if measured else None
        out = {"energy_source": source, "energy_detail": detail, "energy_total_j": total,
               "energy_kwh": total / JOULES_PER_KWH if total is not None else None,
               "energy_windows": self.windows, "energy_unknown_windows": self.unknown_windows,
               "grid_intensity_g_per_kwh": self.grid_g_per_kwh,
               "co2_g": (total / JOULES_PER_KWH * self.grid_g_per_kwh
                         if total is not None and self.grid_g_per_kwh is not None else None),
               **derived(total, samples, tokens_per_sample)}
        return out


def summary_line(s: dict[str, Any]) -> str:
    """One line for the console at the end of a run."""
    if s["energy_total_j"] is None:
        return f"energy: not measured ({s['energy_source']}: {s['energy_detail']})"
    line = (f"energy: {s['energy_total_j'] / 1e3:.3f} kJ = {s['energy_kwh']:.6f} kWh ({s['energy_source']}), "
            f"{s['joules_per_sample']:.4g} J/sample")
    if s["energy_unknown_windows"]:
        line += f"; {s['energy_unknown_windows']} of {s['energy_windows']} windows unmeasured (not in the total)"
    if s["co2_g"] is not None:
        line += f"; {s['co2_g']:.3g} g CO2 at {s['grid_intensity_g_per_kwh']:g} g/kWh"
    return line


def _nan(v: Optional[float]) -> float:
    return math.nan if v is None else float(v)


def _none(v: float) -> Optional[float]:
    return None if math.isnan(v) else v


def _reduce(column: torch.Tensor, fn) -> Optional[float]:
    known = column[~torch.isnan(column)]
    return float(fn(known)) if known.numel() else None

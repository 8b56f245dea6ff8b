"""The trainers' energy telemetry: open this rank's meter from the config, and close the run with a
summary. The measuring itself lives in `dist_train.telemetry` (energy.py, energy_log.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from dist_train.config.schema import Config
from dist_train.errors import UserError
from dist_train.runtime.dist import DistContext
from dist_train.telemetry import make_energy_meter
from dist_train.telemetry.energy_log import EnergyLog, EnergyTotals, summary_line

SUMMARY_FILE = "energy.json"


def open_energy_log(cfg: Config, ctx: DistContext, group_ranks: Optional[Sequence[int]] = None,
                    group: Any = None) -> EnergyLog:
    """This rank's meter inside an `EnergyLog` over `group_ranks` (default: the world). Collective
    over the world. A source forced in the config that this machine cannot read is bad input."""
    try:
        meter = make_energy_meter(cfg.telemetry.energy, ctx.device.index if ctx.device.type == "cuda" else None)
    except ValueError as e:
        raise UserError(f"telemetry.energy: {e}") from None
    return EnergyLog(meter, ctx.rank, ctx.world_size, group_ranks, group, ctx.device)


def run_totals(cfg: Config, writer, energy: EnergyLog, progress) -> EnergyTotals:
    """The run's energy so far, on the rank whose `writer` keeps metrics.jsonl (continued from its
    rows on resume); says once, at the start, what is measured and how."""
    totals = EnergyTotals(cfg.telemetry.grid_intensity_g_per_kwh)
    if writer.enabled:
        totals.resume_from(writer.path)
    progress.note(f"energy: {energy.source} ({energy.detail})")
    return totals


def finish_energy(cfg: Config, run_dir: Path, energy: EnergyLog, totals: EnergyTotals, steps: int,
                  tokens_per_sample: int) -> dict[str, Any]:
    """The run's energy summary (writer rank): written to <run>/energy.json and returned with its
    console line under "energy_summary" (the CLI prints it after the run's last line)."""
    summary = totals.summary(energy.source, energy.detail, steps * cfg.train.batch_size, tokens_per_sample)
    summary["steps"] = steps
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return {**summary, "energy_summary": summary_line(summary)}

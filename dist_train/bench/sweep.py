"""Helpers shared by the benchmarks that sweep learning rates over seeds: summary statistics, the
lr choice on validation, and table column order."""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional


def mean_sd(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def choose_lr(runs: list[dict[str, Any]], lm: bool) -> tuple[Optional[float], dict[float, dict[str, float]]]:
    """The lr of one (task, method, K) chosen on validation only, and the per-lr validation means.

    Classifiers: highest mean val accuracy, ties to lower mean val loss; LM: lowest mean val loss.
    An lr with any failed seed is out (its mean would be over fewer seeds)."""
    by_lr: dict[float, dict[str, float]] = {}
    for lr in sorted({r["lr"] for r in runs}):
        mine = [r for r in runs if r["lr"] == lr]
        if any("error" in r for r in mine) or any(not math.isfinite(r["val_loss"]) for r in mine):
            continue
        by_lr[lr] = {"val_loss": statistics.fmean(r["val_loss"] for r in mine)}
        if not lm:
            by_lr[lr]["val_acc"] = statistics.fmean(r["val_acc"] for r in mine)
    if not by_lr:
        return None, by_lr
    key = (lambda lr: by_lr[lr]["val_loss"]) if lm else (lambda lr: (-by_lr[lr]["val_acc"], by_lr[lr]["val_loss"]))
    return min(by_lr, key=key), by_lr


def ordered(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """`row` with `keys` first, in that order (the printed table's columns), the rest after."""
    return {**{k: row[k] for k in keys if k in row}, **{k: v for k, v in row.items() if k not in keys}}

"""The checkpoint-stall half of `dist-train bench scale` at the smoke size: both sides run, every save
is measured and committed, and the target is the ratio of the two medians."""

from __future__ import annotations

import statistics

import pytest

from dist_train.bench.checkpoint_stall import SIDES, SIZES, measure_stall
from dist_train.bench.report import SIZE_ENV


@pytest.mark.slow
def test_smoke_measures_each_save_of_both_sides(monkeypatch) -> None:
    monkeypatch.setenv(SIZE_ENV, "smoke")
    out = measure_stall(quick=True)
    size = SIZES["smoke"]
    rows = out["rows"]
    assert sorted(r["side"] for r in rows) == sorted(SIDES)
    assert all(r["saves"] == size["steps"] // size["every"] and r["committed"] for r in rows), rows
    assert all(r["stall_s"] > 0 and r["step_s"] > 0 for r in rows)
    assert out["setup"]["checkpoint_bytes"] > 0
    (target,) = out["targets"]
    assert target["metric"] == "stall_async_vs_sync" and target["op"] == "<=" and target["target"] == 0.2
    reported = {x["metric"]: x["value"] for x in out["reported"]}
    assert target["value"] == pytest.approx(reported["stall_async_s"] / reported["stall_sync_s"])
    assert reported["async_all_committed"] == 1.0
    # one repeat: each side's median over its saves is its row's
    assert reported["stall_sync_s"] == statistics.median(r["stall_s"] for r in rows if r["side"] == "sync")
    saves = size["steps"] // size["every"]
    assert reported["async_step_slowdown_s_per_save"] == pytest.approx(
        (reported["step_s_async"] - reported["step_s_sync"]) * size["steps"] / saves)

"""`dist-train bench moe` at the smoke size: every model trains through `dist-train launch` on 2 ranks,
and each target is the ratio of the rows it names (so a target cannot be met by hand)."""

from __future__ import annotations

import pytest

from dist_train.bench.moe import SIZES, run
from dist_train.bench.report import SIZE_ENV


@pytest.mark.slow
def test_smoke_moe_benchmark_measures_every_model(monkeypatch):
    monkeypatch.setenv(SIZE_ENV, "smoke")
    doc = run(quick=True)
    assert doc["name"] == "moe" and doc["provenance"]
    rows = doc["results"]
    size = SIZES["smoke"]
    # soft; per m: global, experts, global on one rank, experts with overlap
    assert len(rows) == 1 + len(size["points"]) * (2 + 2 * len(size["experts"]))
    for r in rows:
        assert 0 < r["rel_l2"] < 10 and r["step_time_s"] > 0
        assert (r["lm_iterations"] is None) == (r["experts"] is None)  # the soft model solves nothing

    def at(k, m, ranks=2, overlap=0):
        return next(r for r in rows if r["experts"] == k and r["points"] == m and r["ranks"] == ranks
                    and r["overlap"] == overlap)

    # The global constraint on one rank for the whole batch (the paper's placement) trains the same
    # model as its data-parallel placement on 2 ranks: same samples, same averaged gradient.
    for m in size["points"]:
        assert at(1, m, ranks=1)["loss"] == pytest.approx(at(1, m)["loss"], rel=1e-3)
        assert at(1, m, ranks=1)["rel_l2"] == pytest.approx(at(1, m)["rel_l2"], rel=1e-3)

    targets = {t["metric"]: t for t in doc["targets"]}
    large, small, k = size["points"][-1], size["points"][0], size["experts"][-1]
    assert targets[f"rel_l2_{k}_experts_vs_global"]["value"] == pytest.approx(at(k, large)["rel_l2"] / at(1, large)["rel_l2"])
    assert targets["step_time_global_vs_experts"]["value"] == pytest.approx(
        at(1, large)["step_time_s"] / at(k, large)["step_time_s"])
    growth = (at(k, large)["step_time_s"] / at(k, small)["step_time_s"]) / (
        at(1, large)["step_time_s"] / at(1, small)["step_time_s"])
    assert targets["step_time_growth_experts_vs_global"]["value"] == pytest.approx(growth)
    reported = {r["metric"]: r["value"] for r in doc["reported"]}
    o = size["overlap"]
    assert at(k, large, overlap=o)["loss"] != at(k, large)["loss"]  # the overlap changes the problem solved
    assert reported[f"rel_l2_{k}_experts_overlap_vs_global"] == pytest.approx(
        at(k, large, overlap=o)["rel_l2"] / at(1, large)["rel_l2"])
    assert reported["step_time_global_vs_experts_overlap"] == pytest.approx(
        at(1, large)["step_time_s"] / at(k, large, overlap=o)["step_time_s"])
    assert reported["step_time_global_1rank_vs_experts"] == pytest.approx(
        at(1, large, ranks=1)["step_time_s"] / at(k, large)["step_time_s"])
    for t in targets.values():
        assert t["met"] == (t["value"] <= t["target"] if t["op"] == "<=" else t["value"] >= t["target"])

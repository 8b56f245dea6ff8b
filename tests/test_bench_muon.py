"""`dist-train bench muon` part (a) at its smoke size: both schemes run on 2 real gloo ranks and
end at the same weights, owner-computes spreads Newton–Schulz over the ranks (each matrix once) while
the naive scheme repeats it on every rank. Nothing here asserts the speed target: that is a
measurement, recorded in BENCHMARKS.md."""

from __future__ import annotations

import pytest

from dist_train.bench.muon import SIZES
from dist_train.bench.muon_step import SHAPES_PER_LAYER, step_time

pytestmark = pytest.mark.slow  # the benchmark at its smoke size (the module fixture)


@pytest.fixture(scope="module")
def smoke():
    return step_time(SIZES["smoke"])


def test_both_schemes_timed_and_agree(smoke):
    rows, fig = smoke
    timed = {r["scheme"]: r for r in rows if r["part"] == "a: step"}
    assert set(timed) == {"owner", "naive"}
    assert all(r["repeats"] == SIZES["smoke"]["repeats"] and r["step_ms_median"] > 0 for r in timed.values())
    # Same steps from the same start: fp32 reduction order aside, the same weights.
    assert fig["max_weight_diff"] < 1e-2
    assert fig["speedup_w2"] > 0


def test_ns_work_is_split_over_owners(smoke):
    rows, fig = smoke
    n_mats = SIZES["smoke"]["layers"] * len(SHAPES_PER_LAYER(1))
    work = {r["world"]: r for r in rows if r["part"] == "a: NS work" and r["scheme"] == "owner"}
    for world in (1, 2, 4):
        per_rank = [int(x) for x in work[world]["ns_matrices_per_rank"].split("/")]
        assert len(per_rank) == world and sum(per_rank) == n_mats  # each matrix exactly once
    assert fig["flops_share"][1] == 1.0
    assert fig["flops_share"][2] < 0.75 and fig["flops_share"][4] < 0.5

"""`dist-train bench diff2` at the smoke size on 4 real gloo workers: both methods at both epsilons,
noise from the accountant at the same (epsilon, delta), the best setting per method picked by mean
final loss; and the benchmark's own fairness rule (equal grid sizes) for the measured sizes."""

from __future__ import annotations

import pytest

from dist_train.bench.diff2 import DELTA, EPSILONS, SIZES, WORKERS, run
from dist_train.bench.report import SIZE_ENV
from dist_train.privacy.diff2 import calibrated_sigmas, diff2_epsilon


@pytest.mark.slow
def test_smoke_document(monkeypatch):
    monkeypatch.setenv(SIZE_ENV, "smoke")
    doc = run(quick=True)
    size = SIZES["smoke"]
    assert {t["metric"] for t in doc["targets"]} == {f"diff2_vs_dpgd_{m}_eps{e:g}" for m in ("loss", "grad_norm")
                                                      for e in EPSILONS}
    assert all(t["value"] is not None and t["value"] > 0 for t in doc["targets"])
    assert [(r["epsilon"], r["method"]) for r in doc["results"]] == [(e, m) for e in EPSILONS
                                                                     for m in ("dp-gd", "diff2")]
    runs = doc["provenance"]["extra"]["all_runs"]
    assert len(runs) == len(EPSILONS) * (len(size["dpgd"]) + len(size["diff2"])) * size["seeds"]
    for r in runs:  # every run spends exactly the budget it is compared at
        eps = diff2_epsilon(r["sigma1"], r["sigma2"], size["n_per_worker"], WORKERS, size["rounds"], r["period"], DELTA)
        assert r["epsilon"] - 1e-3 < eps <= r["epsilon"]
    # each method's chosen setting is re-run on the held-out seeds, and the results rows are those runs
    held = doc["provenance"]["extra"]["held_out_runs"]
    assert len(held) == len(EPSILONS) * 2 * size["eval_seeds"]
    assert {r["seed"] for r in held}.isdisjoint({r["seed"] for r in runs})
    for row in doc["results"]:
        mine = [r for r in held if (r["epsilon"], r["method"]) == (row["epsilon"], row["method"])]
        assert {(r["lr"], r["period"]) for r in mine} == {(row["lr"], row["T"])}
        assert row["losses"] == [r["loss"] for r in mine]
    dpgd = next(r for r in runs if r["method"] == "dp-gd")
    assert dpgd["sigma1"] == calibrated_sigmas(dpgd["epsilon"], DELTA, size["n_per_worker"], WORKERS,
                                               size["rounds"], 1)[0]


@pytest.mark.parametrize("size", ["quick", "full"])
def test_equal_tuning_effort(size):
    assert len(SIZES[size]["dpgd"]) == len(SIZES[size]["diff2"])

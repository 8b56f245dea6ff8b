"""`dist-train bench soak` at the smoke size: a 2-rank pipeline run killed twice (rank 1 in the first
attempt, rank 0 in the second) restarts twice, loses no step, trains on the same examples and ends
at the same loss as the undisturbed run beside it; each kill's recovery is measured."""

from __future__ import annotations

import pytest

from dist_train.bench.report import SIZE_ENV
from dist_train.bench.soak import SIZES, run


@pytest.mark.slow
def test_smoke_soak_loses_nothing(monkeypatch):
    monkeypatch.setenv(SIZE_ENV, "smoke")
    doc = run(quick=True)
    assert doc["name"] == "soak" and doc["provenance"]
    targets = {t["metric"]: t for t in doc["targets"]}
    assert all(t["met"] for t in targets.values()), targets
    assert targets["restarts"]["value"] == len(SIZES["smoke"]["kills"])
    kills = [r for r in doc["results"] if r["run"].startswith("kill")]
    assert [(k["step"], k["rank"], k["attempt"]) for k in kills] == [tuple(k) for k in SIZES["smoke"]["kills"]]
    every = SIZES["smoke"]["every"]
    for k in kills:  # resumed from the last checkpoint before the kill, and it took a measurable time
        assert k["resumed_at_step"] == k["step"] // every * every and k["time_to_resume_s"] > 0

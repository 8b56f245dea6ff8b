"""`dist-train bench scale` at the smoke size: every side trains through the same loop on 2 ranks
and every target is computed from the rows. The compile side is left out here (compiling costs a
minute on 2 cores; `tests/test_compile.py` runs compiled training against eager)."""

from __future__ import annotations

import statistics

import pytest

from dist_train.bench import BENCHMARKS
from dist_train.bench import scale
from dist_train.bench.report import SIZE_ENV


@pytest.mark.slow
def test_smoke_run_measures_every_side_and_derives_the_targets(monkeypatch) -> None:
    assert BENCHMARKS["scale"] == "dist_train.bench.scale"
    monkeypatch.setenv(SIZE_ENV, "smoke")
    monkeypatch.setattr(scale, "SIDES", {k: v for k, v in scale.SIDES.items() if k != "compile"})
    monkeypatch.setattr(scale, "SECTIONS", ("compile_and_checkpointing",))  # the stall's own smoke test: test_bench_checkpoint_stall
    doc = scale.run(quick=True)
    rows = doc["results"]
    assert {r["side"] for r in rows} == {"eager", "full", "selective", "op", "op_half"}
    assert all(r["tokens_s"] > 0 and r["step_bytes"] > 0 for r in rows)
    # the same data, seed and model on every side: checkpointing changes no arithmetic
    losses = {r["side"]: r["loss"] for r in rows}
    assert max(losses.values()) - min(losses.values()) < 1e-4, losses

    def med(side, key):
        return statistics.median(r[key] for r in rows if r["side"] == side)

    t = {x["metric"]: x for x in doc["targets"]}
    assert t["tokens_s_compile_vs_eager"]["value"] is None and not t["tokens_s_compile_vs_eager"]["met"]
    assert t["memory_selective_vs_none"]["value"] == pytest.approx(med("selective", "step_bytes") / med("eager", "step_bytes"))
    assert t["tokens_s_selective_vs_full"]["value"] == pytest.approx(med("selective", "tokens_s") / med("full", "tokens_s"))
    reported = {x["metric"] for x in doc["reported"]}
    assert {"compile_s", "memory_full_vs_none", "memory_op_vs_none", "memory_op_half_vs_none",
            "tokens_s_op_vs_full", "tokens_s_op_half_vs_full"} <= reported

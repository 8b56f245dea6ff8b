"""`dist-train bench dp`: the smoke size runs all four sides and the maximum-batch search and returns
every target (nothing here asserts a target: they are measurements, recorded in BENCHMARKS.md); and
the check that makes the comparison meaningful — one step of the framework's DP-SGD at sigma = 0
moves the parameters exactly as Opacus's per-sample hooks do on the same batch, clipping norm and SGD
learning rate (an independent reference for the book-keeping clipping, through another library).

Tolerance: both sides sum fp32 per-example terms in different orders over every layer: rtol 1e-4,
with an absolute floor of 1e-5 of each parameter's largest update for coordinates near zero.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from dist_train.bench.dp import MAX_BATCH_SIDES, SIDES, SIZES, _batches, _config, build_side, run
from dist_train.bench.report import SIZE_ENV
from dist_train.data import build_dataset
from dist_train.models import build_model
from dist_train.privacy.bookkeeping import per_sample_grad_norms

TARGETS = {"dp_mem_ratio", "dp_throughput_ratio", "dp_vs_opacus_ghost", "dp_max_batch_vs_opacus_hooks"}


@pytest.mark.slow
def test_smoke_document_has_all_sides_and_targets(monkeypatch):
    monkeypatch.setenv(SIZE_ENV, "smoke")  # tiny model, two steps, a budget the grid fits: runs, measures nothing
    doc = run(quick=True)
    assert doc["name"] == "dp" and doc["provenance"]
    assert {t["metric"] for t in doc["targets"]} == TARGETS
    assert all(t["value"] is not None for t in doc["targets"])
    step = {r["side"]: r for r in doc["results"] if r["part"] == "a: step"}
    assert set(step) == set(SIDES)
    for r in step.values():
        assert r["samples_per_s"] > 0 and r["batch"] == SIZES["smoke"]["batch"]
        assert r["mem_increase_mib"] >= 0 and r["repeats"] == SIZES["smoke"]["repeats"]
    search = {r["side"]: r for r in doc["results"] if r["part"] == "b: max batch"}
    assert set(search) == set(MAX_BATCH_SIDES) and all(r["max_batch"] >= 8 for r in search.values())
    # The memory target is read as peak allocated tensor bytes (the allocator's events on CPU,
    # max_memory_allocated on a GPU), never the resident set; the RSS ratio is reported with no target.
    extra = doc["provenance"]["extra"]
    alloc, rss = extra["increase_bytes"], extra["rss_increase_bytes"]
    mem = next(t for t in doc["targets"] if t["metric"] == "dp_mem_ratio")
    assert mem["value"] == pytest.approx(statistics.median(a / b for a, b in zip(alloc["dist-train"], alloc["nonprivate"])))
    assert "allocated" in mem["description"] and "allocated" in extra["memory"]
    reported = {r["metric"]: r for r in doc["reported"]}
    assert reported["rss_ratio_dist_train"]["value"] == pytest.approx(
        statistics.median(a / b for a, b in zip(rss["dist-train"], rss["nonprivate"])))
    assert not any("rss" in t["metric"] for t in doc["targets"])
    # Same model, same first batch on every side: the same first loss (the sides differ only in clipping).
    first = doc["provenance"]["extra"]["first_losses"]  # the benchmark's setup, as document() stores it
    for side in SIDES:
        assert first[side][0] == pytest.approx(first["nonprivate"][0], rel=1e-5)


def test_one_step_matches_opacus_hooks_at_sigma_zero():
    size, batch, cpu = SIZES["smoke"], 6, torch.device("cpu")
    data = build_dataset(_config(size, batch).data, size["block"])
    (x, y), = _batches(data, 1, batch, cpu)
    # C between the per-example norms: some examples are clipped, some are not.
    torch.manual_seed(0)
    probe = build_model(_config(size, batch).model, data.info)
    norms = per_sample_grad_norms(probe, lambda out, t: probe.loss(out, t) * t.size(0), x, y).sort().values
    clip = float(norms[2:4].mean())
    assert norms[0] < clip < norms[-1]
    cfg = _config(size, batch, sigma=0.0, clip=clip)
    updates = {}
    for side in ("dist-train", "opacus-hooks"):
        step, model = build_side(side, cfg, data, cpu, batch)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        step(x, y)
        updates[side] = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    assert updates["dist-train"].keys() == updates["opacus-hooks"].keys()
    for name, want in updates["opacus-hooks"].items():
        got = updates["dist-train"][name]
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()), msg=name)


def test_allocated_peak_counts_every_allocation_and_temporary():
    """The CPU memory figure: the peak of live tensor bytes inside the block, over those live on entry,
    worked out by hand below (tensors of known byte sizes; a product freed inside a reduction)."""
    from dist_train.bench.dp import allocated_increase

    mib = 1 << 20
    before = torch.ones(mib // 4)  # 1 MiB live on entry, freed inside: not part of the increase

    def run():
        nonlocal before
        a = torch.empty(4 * mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)  # live: 6 MiB
        del a, before  # 2 MiB (-1 MiB that was live on entry)
        x = torch.ones(mib // 4)  # 1 MiB of fp32: live 3
        total = (x * 2.0).sum()  # the 1 MiB product lives only inside this line: 4, then 3
        c = torch.empty(3 * mib, dtype=torch.uint8)  # 6
        return b, c, total

    assert allocated_increase(run, torch.device("cpu")) == pytest.approx(6 * mib, abs=4096)

    def bigger():
        y = torch.ones(2 * mib)  # 8 MiB of fp32
        return (y * y).sum()  # 16 MiB at the product

    assert allocated_increase(bigger, torch.device("cpu")) == pytest.approx(16 * mib, abs=4096)

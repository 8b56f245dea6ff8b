"""`dist-train bench moe` at the smoke size: every model trains on the ranks `dist-train launch` starts
(2, or 1 for the one-rank row), and each target is the ratio of the rows it names (so a target cannot
be met by hand)."""

from __future__ import annotations

import statistics

import pytest

from dist_train.bench.moe import SIZES, run
from dist_train.bench.report import SIZE_ENV


@pytest.mark.slow
def test_smoke_moe_benchmark_measures_every_model(monkeypatch):
    import dist_train.bench.moe as bench
    from cli_helpers import forked_run

    monkeypatch.setenv(SIZE_ENV, "smoke")
    # The 9 runs' ranks forked from the fork server (torch imported once) rather than a `dist-train
    # launch` process per run starting fresh interpreters: the same `dist-train run` on the same
    # ranks, minus about 10 s of interpreter starts per run on a loaded 2-core machine. The launch
    # itself is the launcher tests' (test_launch.py).
    monkeypatch.setattr(bench, "_launch", lambda work, args, nproc, timeout: forked_run(args, work, nproc, timeout=timeout))
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
    # The step-time target is against the paper's placement (one rank); equal devices are reported.
    assert targets["step_time_global_1rank_vs_experts"]["value"] == pytest.approx(
        at(1, large, ranks=1)["step_time_s"] / at(k, large)["step_time_s"])
    assert targets["step_time_global_1rank_vs_experts"]["op"] == ">=" and targets["step_time_global_1rank_vs_experts"]["target"] == 1.5
    assert "step_time_global_vs_experts" not in targets
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
    assert reported["step_time_global_vs_experts"] == pytest.approx(
        at(1, large)["step_time_s"] / at(k, large)["step_time_s"])
    for t in targets.values():
        assert t["met"] == (t["value"] <= t["target"] if t["op"] == "<=" else t["value"] >= t["target"])


def test_lr_sweep_reports_each_model_at_its_best_lr(monkeypatch):
    # The selection logic alone, with made-up figures: every model trains at every lr of the size,
    # each row is kept, and the targets use each model's lowest-error lr — whichever lr that is.
    import dist_train.bench.moe as bench

    error = {("soft", 1e-3): 0.9, ("soft", 3e-3): 0.8, ("k1_m64", 1e-3): 0.2, ("k1_m64", 3e-3): 0.05,
             ("k2_m64", 1e-3): 0.3, ("k2_m64", 3e-3): 0.4, ("k2_m64_o2", 1e-3): 0.5, ("k2_m64_o2", 3e-3): 0.1}
    calls = []

    def fake(work, name, size, overrides, nproc=2):
        base, lr = name.rsplit("_lr", 1)
        calls.append((base, float(lr), overrides))
        return {"rel_l2": error[(base, float(lr))], "residual": 0.0, "loss": 0.0, "step_time_s": 0.1 * (1 + float(lr)),
                "lm_iterations": None, "wall_s": 0.0, "rel_l2_each": "", "rel_l2_seeds": [error[(base, float(lr))]]}

    monkeypatch.setattr(bench, "_repeated", fake)
    monkeypatch.setitem(bench.SIZES, "sweep", {"points": [64], "experts": [2], "steps": 1, "log_every": 1, "repeats": 1,
                                               "limit_s": 1, "extra": [], "one_rank": False, "overlap": 2,
                                               "lrs": [1e-3, 3e-3]})
    monkeypatch.setenv(SIZE_ENV, "sweep")
    doc = bench.run(quick=True)
    assert sorted((b, lr) for b, lr, _ in calls) == sorted(error)
    assert all(f"optim.lr={lr:g}" in o for _, lr, o in calls)
    assert len(doc["results"]) == len(error)
    best = {(r["model"], r["lr"]) for r in doc["results"] if r["best_lr"]}
    assert best == {("soft constraint", 3e-3), ("global hard constraint", 3e-3), ("2 experts", 1e-3),
                    ("2 experts, overlap 2", 3e-3)}
    targets = {t["metric"]: t["value"] for t in doc["targets"]}
    assert targets["rel_l2_2_experts_vs_global"] == pytest.approx(0.3 / 0.05)
    assert targets["rel_l2_experts_vs_soft"] == pytest.approx(0.3 / 0.8)
    reported = {r["metric"]: r["value"] for r in doc["reported"]}
    assert reported["rel_l2_2_experts_overlap_vs_global"] == pytest.approx(0.1 / 0.05)


def test_a_size_with_some_rows_sets_only_the_targets_it_can_and_pairs_seeds(monkeypatch):
    # overlap_seeds trains the global constraint and the overlapping experts only: no target divides
    # rows it did not train, and each seed's experts are compared with the same seed's global run.
    import dist_train.bench.moe as bench

    per_seed = {"k1_m64": [0.10, 0.20, 0.40], "k2_m64_o2": [0.08, 0.30, 0.20]}
    names = []

    def fake(work, name, size, overrides, nproc=2):
        base = name.rsplit("_lr", 1)[0]
        names.append(base)
        seeds = per_seed[base]
        return {"rel_l2": sorted(seeds)[1], "residual": 0.0, "loss": 0.0, "step_time_s": 0.1, "lm_iterations": 3,
                "wall_s": 0.0, "rel_l2_each": "", "rel_l2_seeds": seeds}

    monkeypatch.setattr(bench, "_repeated", fake)
    monkeypatch.setitem(bench.SIZES, "pairs", {"points": [64], "experts": [2], "steps": 1, "log_every": 1, "repeats": 3,
                                               "limit_s": 1, "extra": [], "overlap": 2, "lrs": [1e-3],
                                               "rows": ["global", "overlap"]})
    monkeypatch.setenv(SIZE_ENV, "pairs")
    doc = bench.run(quick=True)
    assert names == ["k1_m64", "k2_m64_o2"]
    assert doc["targets"] == []  # every target divides a row this size does not train
    reported = {r["metric"]: r["value"] for r in doc["reported"]}
    assert reported["rel_l2_2_experts_overlap_vs_global"] == pytest.approx(0.20 / 0.20)
    assert reported["rel_l2_2_experts_overlap_vs_global_paired_median"] == pytest.approx(0.8)  # 0.8, 1.5, 0.5
    assert reported["rel_l2_2_experts_overlap_vs_global_paired_worst"] == pytest.approx(1.5)
    assert reported["rel_l2_2_experts_overlap_vs_global_paired_below_1"] == 2
    assert "rel_l2_2_experts_vs_global_paired_median" not in reported  # its experts row was not trained
    assert reported["step_time_global_vs_experts_overlap"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown row kinds"):
        bench._models({**bench.SIZES["pairs"], "rows": ["globl"]})


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_size_trains_valid_configs(size):
    # A size's overrides are only read by the launched runs; a typo there, or a row the launcher
    # refuses, would fail half an hour in. Each row's config trains the model the row names.
    import dist_train.bench.moe as bench
    from dist_train.config.layout import check_layout
    from dist_train.config.load import load_config

    for model in bench._models(SIZES[size]):
        cfg = load_config(bench._config(SIZES[size]), [*bench.COMMON, *SIZES[size]["extra"], *model["overrides"]])
        check_layout(cfg, model["ranks"])  # what `dist-train launch` checks before it starts the ranks
        assert cfg.moe.constraint == ("soft" if model["kind"] == "soft" else "hard"), model["name"]
        if model["kind"] != "soft":
            assert (cfg.moe.experts, cfg.moe.points, cfg.moe.overlap) == (
                model["experts"], model["points"], model["overlap"]), model["name"]


def test_time_split_sizes_cut_each_experts_row_into_k_time_bands():
    import dist_train.bench.moe as bench

    rows = {m["experts"]: m for m in bench._models(SIZES["sorption_time"]) if m["kind"] in ("global", "experts")}
    assert "moe.time_splits=2" in rows[2]["overrides"] and "moe.time_splits=4" in rows[4]["overrides"]
    assert not any("time_splits" in o for o in rows[1]["overrides"])  # one global constraint: nothing to cut
    assert not any("time_splits" in o for m in bench._models(SIZES["sorption"]) for o in m["overrides"])
    with pytest.raises(ValueError, match="split must be space or time"):
        bench._models({**SIZES["sorption"], "split": "diagonal"})


def test_one_rank_steps_trains_only_the_one_rank_row_shorter(monkeypatch):
    # sorption_scale times the paper's one-rank placement on fewer steps (it trains the 2-rank global
    # row's model, so only its step time is new): that row alone gets the shorter schedule, evaluated
    # once at its end; every other row keeps the size's steps and evaluation interval.
    import dist_train.bench.moe as bench

    seen = {}

    def fake(work, name, size, overrides, nproc=2):
        seen[name.rsplit("_lr", 1)[0]] = (size["steps"], size.get("eval_every"), nproc)
        return {"rel_l2": 0.1, "residual": 0.0, "loss": 0.0, "step_time_s": 0.2 if nproc == 1 else 0.1,
                "lm_iterations": 3, "wall_s": 0.0, "rel_l2_each": "", "rel_l2_seeds": [0.1]}

    monkeypatch.setattr(bench, "_repeated", fake)
    monkeypatch.setenv(SIZE_ENV, "sorption_scale")
    doc = bench.run(quick=True)
    size = SIZES["sorption_scale"]
    for m in size["points"]:
        assert seen[f"k1_m{m}_1rank"] == (size["one_rank_steps"], size["one_rank_steps"], 1)
        for k in (1, *size["experts"]):
            assert seen[f"k{k}_m{m}"] == (size["steps"], size["eval_every"], 2)
    assert seen["soft"] == (size["steps"], size["eval_every"], 2)
    steps = {(r["kind"], r["points"]): r["steps"] for r in doc["results"]}
    assert steps[("one_rank", 4096)] == size["one_rank_steps"] and steps[("global", 4096)] == size["steps"]
    targets = {t["metric"]: t for t in doc["targets"]}
    assert targets["step_time_global_1rank_vs_experts"]["value"] == pytest.approx(2.0)
    assert f"over its {size['one_rank_steps']} steps only" in targets["step_time_global_1rank_vs_experts"]["description"]


def test_experts_are_paired_seed_by_seed_with_the_global_constraint(monkeypatch):
    # With several seeds, each experts row at the largest m is divided by the global row of the same
    # seed, for the error and for the step time, besides the medians' ratio the targets use.
    import dist_train.bench.moe as bench

    per_seed = {"k1_m64": ([0.10, 0.20], [1.0, 2.0]), "k2_m64": ([0.05, 0.30], [0.5, 4.0])}

    def fake(work, name, size, overrides, nproc=2):
        errors, times = per_seed[name.rsplit("_lr", 1)[0]]
        return {"rel_l2": statistics.median(errors), "residual": 0.0, "loss": 0.0,
                "step_time_s": statistics.median(times), "lm_iterations": 3, "wall_s": 0.0, "rel_l2_each": "",
                "rel_l2_seeds": errors, "step_time_s_seeds": times}

    monkeypatch.setattr(bench, "_repeated", fake)
    monkeypatch.setitem(bench.SIZES, "pairs2", {"points": [64], "experts": [2], "steps": 1, "log_every": 1,
                                                "repeats": 2, "limit_s": 1, "extra": [], "lrs": [1e-3],
                                                "rows": ["global", "experts"]})
    monkeypatch.setenv(SIZE_ENV, "pairs2")
    reported = {r["metric"]: r["value"] for r in bench.run(quick=True)["reported"]}
    # errors: 0.05 / 0.10 = 0.5 and 0.30 / 0.20 = 1.5
    assert reported["rel_l2_2_experts_vs_global_paired_median"] == pytest.approx(1.0)
    assert reported["rel_l2_2_experts_vs_global_paired_worst"] == pytest.approx(1.5)
    assert reported["rel_l2_2_experts_vs_global_paired_below_1"] == 1
    # step time, global / experts: 1.0 / 0.5 = 2 and 2.0 / 4.0 = 0.5; the worst is the smallest
    assert reported["step_time_global_vs_2_experts_paired_median"] == pytest.approx(1.25)
    assert reported["step_time_global_vs_2_experts_paired_worst"] == pytest.approx(0.5)
    assert reported["step_time_global_vs_2_experts_paired_above_1"] == 1

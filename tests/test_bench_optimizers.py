"""`dist-train bench optimizers`: the figures and targets from hand-made runs (the speed-up read off the
final losses of own-schedule runs, the wall speed-up from the step times, every target under its
name), which setting each ladder run uses, the arms' overrides, and a smoke-size run of the whole
command (real training, the 2-rank step timing, the JSON and the plot). Nothing here asserts that a
target is met: that is a measurement, recorded in BENCHMARKS.md."""

from __future__ import annotations

import json
import math

import pytest

from dist_train.bench import optimizer_space as space
from dist_train.bench.optimizer_study import budgets, run_overrides, setting_for
from dist_train.bench.optimizers import SIZES, summarize, targets_and_reported
from dist_train.bench.tuning import DescentResult

SIZE = {**SIZES["full"], "models": {"small": (2, 64, 2), "large": (4, 128, 4)}}
TARGETS = [f"normuon_minus_muon_final_val_loss_{m}_{h}" for m in ("small", "large") for h in ("short", "long")] + [
    "speedup_steps_normuon_small_short", "speedup_steps_normuon_small_long", "normuon_minus_muon_final_val_loss",
    "normuon_steps_to_adamw_loss_ratio"]


def _tuned(arm: str) -> dict:
    """Each (size, horizon) tuned to a setting of its own, so a run's setting says which it used."""
    return {(m, h): DescentResult({**space.start(arm), "lr": lr}, 2.0, [], 2, True)
            for (m, h), lr in {("small", "short"): 0.1, ("small", "long"): 0.05, ("large", "short"): 0.2,
                               ("large", "long"): 0.4}.items()}


def _runs(tuned: dict, losses: dict) -> list[dict]:
    """Two seeds per (arm, size, steps), at the setting the study would use, losses +-0.01 around the given mean."""
    runs = []
    for (arm, model, steps), loss in losses.items():
        setting = setting_for(tuned[arm], SIZE, model, steps)
        for seed, d in ((0, -0.01), (1, 0.01)):
            runs.append({"arm": arm, "model": model, "steps": steps, "seed": seed, "setting": setting,
                         "test_loss": loss + d, "val_loss": loss, "train_loss": loss})
    return runs


def test_speedups_are_read_off_own_schedule_runs_and_every_target_is_named() -> None:
    tuned = {arm: _tuned(arm) for arm in space.ARMS}
    ladder = budgets(SIZE, "muon")
    assert ladder == [25, 50, 100, 200, 400] and budgets(SIZE, "adamw") == [100, 400]
    losses = {}
    for model in ("small", "large"):
        losses["adamw", model, 100], losses["adamw", model, 400] = 2.0, 1.7
        for arm, shift in (("muon", 0.0), ("normuon", -0.05), ("normuon_paper", 0.05)):
            # loss falls 0.2 per doubling of the steps, from 2.4 at 25 steps
            for i, steps in enumerate(ladder):
                losses[arm, model, steps] = 2.4 - 0.2 * i + shift
    step_s = {(arm, m): {"adamw": 1.0, "muon": 1.25, "normuon": 1.3, "normuon_paper": 1.3}[arm]
              for arm in space.ARMS for m in ("small", "large")}
    rows = summarize(SIZE, tuned, _runs(tuned, losses), step_s)
    row = next(r for r in rows if (r["size"], r["horizon"], r["arm"]) == ("small", "short", "muon"))
    # AdamW ends at 2.0 after 100 steps; muon's runs: 2.2 at 50 steps, 2.0 at 100: 2.0 is reached at 100
    assert row["steps_to_adamw_loss"] == pytest.approx(100.0) and row["speedup_steps"] == pytest.approx(1.0)
    assert row["speedup_wall"] == pytest.approx(1.0 / 1.25)
    assert row["test_loss"] == pytest.approx(2.0) and row["test_sd"] == pytest.approx(0.01 * math.sqrt(2))
    assert row["setting"] == space.describe({**space.start("muon"), "lr": 0.1})
    nm = next(r for r in rows if (r["size"], r["horizon"], r["arm"]) == ("small", "short", "normuon"))
    # normuon's runs are 0.05 lower: 2.0 lies a quarter of the way from 2.15 (50) to 1.95 (100) in log-steps
    assert nm["speedup_steps"] == pytest.approx(100 / (50 * 2 ** 0.75)) and nm["speedup_bound"] == "exact"
    long = next(r for r in rows if (r["size"], r["horizon"], r["arm"]) == ("large", "long", "normuon"))
    # AdamW 1.7 at 400; normuon: 1.75 at 200 (long setting), 1.55 at 400: a quarter of a doubling past 200
    assert long["speedup_steps"] == pytest.approx(400 / (200 * 2 ** 0.25))
    assert long["minus_adamw"] == pytest.approx(1.55 - 1.7)
    targets, reported = targets_and_reported(SIZE, rows)
    assert [t["metric"] for t in targets] == TARGETS
    by = {t["metric"]: t for t in targets}
    assert by["normuon_minus_muon_final_val_loss_small_short"]["value"] == pytest.approx(-0.05)
    assert by["normuon_steps_to_adamw_loss_ratio"]["value"] == pytest.approx(50 * 2 ** 0.75 / 100)
    assert by["speedup_steps_normuon_small_short"]["met"] is False  # 1.19 < 1.3
    names = {r["metric"] for r in reported}
    for arm in ("muon", "normuon", "normuon_paper"):
        for tag in ("small_short", "small_long", "large_short", "large_long"):
            assert f"speedup_wall_{arm}_{tag}" in names and f"{arm}_minus_adamw_final_loss_{tag}" in names
            assert f"speedup_steps_{arm}_{tag}" in names or f"speedup_steps_{arm}_{tag}" in by


def test_settings_at_a_ladder_end_are_flagged() -> None:
    from dist_train.bench.optimizers import at_ladder_end

    assert at_ladder_end("muon", {**space.start("muon"), "momentum": 0.8, "warmup": 0.0}) == "momentum=0.8 (bottom)"
    top = space.axes("adamw")[0].values[-1]
    assert at_ladder_end("adamw", {**space.start("adamw"), "lr": top}) == f"lr={top:g} (top)"
    assert at_ladder_end("normuon", space.start("normuon")) == ""


def test_ladder_runs_use_the_setting_of_the_nearer_tuned_horizon() -> None:
    tuned = _tuned("normuon")
    lr = {steps: setting_for(tuned, SIZE, "small", steps)["lr"] for steps in budgets(SIZE, "normuon")}
    assert lr == {25: 0.1, 50: 0.1, 100: 0.1, 200: 0.05, 400: 0.05}  # 200 is a tie in log-steps: the longer


def test_the_arms_differ_in_their_optimizer_only() -> None:
    """The two NorMuon arms differ only in Nesterov; every arm's run shares model, data, batch and steps."""
    setting = space.start("normuon")
    arm = run_overrides(SIZE, "normuon", "small", 100, setting, 0)
    paper = run_overrides(SIZE, "normuon_paper", "small", 100, setting, 0)
    assert sorted(set(arm) ^ set(paper)) == ["optim.matrix.nesterov=false", "optim.matrix.nesterov=true"]
    assert "optim.warmup_steps=10" in arm and "optim.matrix.beta2=0.95" in arm and "optim.matrix.adamw_lr=0.003" in arm
    adamw = run_overrides(SIZE, "adamw", "small", 100, space.start("adamw"), 0)
    shared = [o for o in arm if not o.startswith("optim.")]
    assert shared == [o for o in adamw if not o.startswith("optim.")]
    assert "optim.beta2=0.95" in adamw and not any(o.startswith("optim.matrix.") for o in adamw)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_run_writes_the_document_and_the_plot(tmp_path, monkeypatch) -> None:
    from dist_train.bench import run_benchmark

    monkeypatch.setenv("DIST_TRAIN_BENCH_SIZE", "smoke")
    out = tmp_path / "optimizers.json"
    assert run_benchmark("optimizers", quick=True, json_path=str(out)) == 0
    doc = json.loads(out.read_text())
    assert [t["metric"] for t in doc["targets"]] == TARGETS
    setup = doc["provenance"]["extra"]
    assert setup["size"] == "smoke"
    timed = [r for r in doc["results"] if r["part"] == "a: step time"]
    assert {(r["arm"], r["model"]) for r in timed} == {(a, m) for a in space.ARMS for m in ("small", "large")}
    assert all(r["step_s"] > 0 for r in timed)
    final = [r for r in doc["results"] if r["part"] == "b: final"]
    assert len(final) == 4 * 4 and all(math.isfinite(r["test_loss"]) for r in final)
    for key, record in setup["tuning"].items():  # every descent stopped where no neighbour is better
        assert record["converged"], key
        assert all(v > record["val_loss"] or v == record["val_loss"]
                   for pairs in record["neighbours"].values() for _, v in pairs), key
    assert out.with_suffix(".png").stat().st_size > 1000

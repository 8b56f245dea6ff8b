"""Part (b) of `dist-train bench muon` (AdamW vs Muon vs NorMuon convergence): the steps-to-loss
reading and the targets on hand-computed curves, and a smoke-size run of real training that reports
both targets under their exact names. Nothing here asserts a target is met: that is a measurement."""

from __future__ import annotations

import math

import pytest

from dist_train.bench.muon_convergence import OPTIMIZERS, SIZES, convergence, run_overrides, steps_to_loss, summarize

TARGET_NAMES = ["normuon_steps_to_adamw_loss_ratio", "normuon_minus_muon_final_val_loss"]


def test_steps_to_loss_interpolates_between_evaluations() -> None:
    curve = [(10, 3.0), (20, 2.5), (30, 2.0), (40, 1.8)]
    # 2.2 lies 0.3 of the way down from 2.5 (step 20) to 2.0 (step 30): 20 + 10 * 0.3 / 0.5 = 26
    assert steps_to_loss(curve, 2.2) == pytest.approx(26.0)
    assert steps_to_loss(curve, 2.0) == pytest.approx(30.0)  # reached exactly at an evaluation
    assert steps_to_loss(curve, 1.8) == pytest.approx(40.0)
    assert steps_to_loss(curve, 1.7) is None  # never reached
    assert steps_to_loss(curve, 3.5) == pytest.approx(10.0)  # already at the first evaluation
    assert steps_to_loss(list(reversed(curve)), 2.2) == pytest.approx(26.0)  # order of the points is irrelevant
    # The first crossing counts, even if the curve rises again afterwards.
    assert steps_to_loss([(10, 3.0), (20, 2.0), (30, 2.6), (40, 1.9)], 2.5) == pytest.approx(15.0)
    assert steps_to_loss([(10, 3.0), (20, math.nan), (30, 1.0)], 2.0) is None  # diverged


def _runs(optimizer: str, lr: float, curves: list[list[float]]) -> list[dict]:
    return [{"optimizer": optimizer, "lr": lr, "seed": seed, "val_loss": c[-1], "train_loss": c[-1], "cpu_s": 1.0,
             "curve": [(10 * (i + 1), v) for i, v in enumerate(c)]} for seed, c in enumerate(curves)]


def test_summary_and_targets_on_hand_computed_curves() -> None:
    size = {**SIZES["smoke"], "steps": 40,
            "grids": {"adamw": [1e-3, 3e-3, 1e-2], "muon": [0.01, 0.02, 0.05], "normuon": [1e-3, 3e-3, 1e-2],
                      "normuon_paper": [1e-3, 3e-3, 1e-2]}}
    runs = [
        # AdamW: best lr 3e-3 (mean final 2.0), the others end higher.
        *_runs("adamw", 1e-3, [[4.0, 3.5, 3.0, 2.5], [4.0, 3.5, 3.0, 2.7]]),
        *_runs("adamw", 3e-3, [[3.5, 3.0, 2.5, 2.1], [3.5, 3.0, 2.3, 1.9]]),
        *_runs("adamw", 1e-2, [[3.5, 3.0, 2.6, 2.2], [3.5, 3.0, 2.6, 2.4]]),
        # Muon: best 0.05 (mean final 1.9), at the top of its grid.
        *_runs("muon", 0.01, [[3.6, 3.0, 2.6, 2.3], [3.6, 3.0, 2.6, 2.3]]),
        *_runs("muon", 0.02, [[3.4, 2.8, 2.3, 2.0], [3.4, 2.8, 2.3, 2.0]]),
        *_runs("muon", 0.05, [[3.3, 2.7, 2.2, 1.9], [3.3, 2.7, 2.2, 1.9]]),
        # NorMuon: best 3e-3; mean curve 3.2, 2.6 (seeds 2.5 and 2.7), 1.9, 1.8.
        *_runs("normuon", 1e-3, [[3.6, 3.1, 2.8, 2.6], [3.6, 3.1, 2.8, 2.6]]),
        *_runs("normuon", 3e-3, [[3.2, 2.5, 1.9, 1.8], [3.2, 2.7, 1.9, 1.8]]),
        *_runs("normuon", 1e-2, [[3.1, 2.6, 2.0, 1.85], [3.1, 2.6, 2.0, 1.85]]),
        # NorMuon without Nesterov: reported only; ending far below Muon must not move either target.
        *_runs("normuon_paper", 1e-3, [[3.0, 2.0, 1.5, 1.0], [3.0, 2.0, 1.5, 1.0]]),
        *_runs("normuon_paper", 1e-2, [[3.0, 2.5, 2.0, 1.9], [3.0, 2.5, 2.0, 1.9]]),
    ]
    rows, targets = summarize(size, runs)
    by = {r["optimizer"]: r for r in rows}
    assert [r["optimizer"] for r in rows] == list(OPTIMIZERS)
    assert (by["adamw"]["lr"], by["muon"]["lr"], by["normuon"]["lr"]) == (3e-3, 0.05, 3e-3)
    assert by["normuon_paper"]["lr"] == 1e-3 and by["normuon_paper"]["val_loss"] == pytest.approx(1.0)
    assert by["adamw"]["val_loss"] == pytest.approx(2.0)
    assert by["adamw"]["val_sd"] == pytest.approx(math.sqrt(0.02))
    assert by["adamw"]["bracketed"] and by["normuon"]["bracketed"] and not by["muon"]["bracketed"]
    # AdamW's mean curve 3.5, 3.0, 2.4, 2.0 reaches its own final loss at the end: ratio 1.
    assert by["adamw"]["steps_ratio"] == pytest.approx(1.0)
    # Muon's 2.7 -> 2.2 between steps 20 and 30 crosses 2.0 only later: 2.2 -> 1.9 at 30 + 10 * 0.2 / 0.3.
    assert by["muon"]["steps_to_adamw_loss"] == pytest.approx(30 + 10 * 0.2 / 0.3)
    # NorMuon's 2.6 (step 20) -> 1.9 (step 30) crosses 2.0 at 20 + 10 * 0.6 / 0.7; / 40 steps.
    ratio = (20 + 10 * 0.6 / 0.7) / 40
    assert [t["metric"] for t in targets] == TARGET_NAMES
    assert targets[0]["value"] == pytest.approx(ratio) and targets[0]["op"] == "<=" and targets[0]["target"] == 0.8
    assert targets[0]["met"] is (ratio <= 0.8)
    assert targets[1]["value"] == pytest.approx(1.8 - 1.9) and targets[1]["op"] == "<=" and targets[1]["target"] == 0.0
    assert targets[1]["met"] is True


def test_never_reaching_adamw_loss_leaves_the_target_unmet() -> None:
    size = {**SIZES["smoke"], "steps": 20}
    runs = [*_runs("adamw", 1e-3, [[3.0, 2.0]]), *_runs("adamw", 1e-2, [[3.0, 2.5]]),
            *_runs("muon", 0.01, [[3.0, 2.4]]), *_runs("muon", 0.05, [[3.0, 2.6]]),
            *_runs("normuon", 1e-3, [[3.0, 2.2]]), *_runs("normuon", 1e-2, [[3.0, 2.3]]),
            *_runs("normuon_paper", 1e-3, [[3.0, 1.9]]), *_runs("normuon_paper", 1e-2, [[3.0, 2.3]])]
    rows, targets = summarize(size, runs)
    assert rows[2]["steps_to_adamw_loss"] is None
    assert targets[0]["value"] is None and targets[0]["met"] is False
    assert targets[1]["value"] == pytest.approx(2.2 - 2.4) and targets[1]["met"] is True


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_run_reports_both_targets(monkeypatch) -> None:
    """Real training runs (tiny GPT, a few steps): one row per (optimizer, lr, seed), a summary per
    optimizer, both targets under their exact names with `met` computed from the value."""
    monkeypatch.setenv("DIST_TRAIN_BENCH_SIZE", "smoke")
    rows, targets, setup = convergence(quick=True)
    size = SIZES["smoke"]
    assert setup["size"] == "smoke" and setup["threads"] == 1 and setup["steps"] == size["steps"]
    for key in ("model", "data", "steps", "batch", "seeds", "grids", "threads"):
        assert key in setup, key
    summary = [r for r in rows if r["part"] == "b: convergence"]
    runs = [r for r in rows if r["part"] == "b: runs"]
    assert [r["optimizer"] for r in summary] == list(OPTIMIZERS)
    assert sorted((r["optimizer"], r["lr"], r["seed"]) for r in runs) == sorted(
        (o, lr, s) for o in OPTIMIZERS for lr in size["grids"][o] for s in size["seeds"])
    for r in runs:
        assert "error" not in r, r
        assert math.isfinite(r["val_loss"]) and len(r["curve"]) == min(10, size["steps"])
        assert tuple(r["curve"][-1]) == (size["steps"], r["val_loss"])  # the last evaluation is the final one
    for r in summary:
        assert r["lr"] in size["grids"][r["optimizer"]]
    assert [t["metric"] for t in targets] == TARGET_NAMES
    for t in targets:
        assert t["op"] == "<=" and t["met"] is (t["value"] is not None and t["value"] <= t["target"])


def test_the_two_normuon_arms_differ_only_in_nesterov() -> None:
    """The target's NorMuon takes Nesterov momentum like Muon; the paper arm is Algorithm 1 as written.
    Everything else in the two runs' overrides is the same."""
    size = SIZES["full"]
    arm = run_overrides(size, "normuon", 1e-2)
    paper = run_overrides(size, "normuon_paper", 1e-2)
    assert "optim.name=normuon" in arm and "optim.matrix.nesterov=true" in arm
    assert "optim.matrix.nesterov=false" in paper
    assert sorted(set(arm) ^ set(paper)) == ["optim.matrix.nesterov=false", "optim.matrix.nesterov=true"]
    muon = run_overrides(size, "muon", 1e-2)
    assert "optim.name=muon" in muon and [o for o in muon if o.startswith("optim.matrix.adamw_lr")] == [
        o for o in arm if o.startswith("optim.matrix.adamw_lr")]

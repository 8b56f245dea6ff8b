"""`dist-train bench optimizers`: AdamW, Muon and NorMuon tuned alike, at two model sizes and two
horizons, compared at the end of each run's own schedule (Wen et al., "Fantastic Pretraining
Optimizers and Where to Find Them", 2025).

The model is the byte-level GPT trained on the stdlib_bytes corpus (context 64, batch 32, cosine
schedule to 0.1x after a linear warm-up, gradient clipping 1.0); every run is the framework's own
training loop, one process, one CPU thread (`optimizer_study.py`). Two sizes whose non-embedding
parameters differ by about 8x (2 layers x 64 and 4 layers x 128), two horizons 4x apart in steps and
tokens (100 and 400 steps of 2048 tokens). The corpus is split into train, validation (5%) and a
held-out test split (5%): settings are chosen on validation, every figure below is read on test.

Tuning (`tuning.py`, the paper's coordinate descent; hyperparameters and ladders in
`optimizer_space.py`): every arm gets the same procedure, all its hyperparameters at the short
horizon of each size, its learning rates again at the long horizon (a simplification of the paper,
which re-tunes only its "scaling-sensitive" hyperparameters beyond its first phase).

The figure (`speedup.py`): for each size and horizon, AdamW's steps divided by the steps the
optimizer needs to reach AdamW's final test loss, read off the optimizer's final losses at a ladder
of run lengths (1/4, 1/2, 1, 2 and 4 times the short horizon, each its own run and schedule, mean over
seeds 0 and 1), linear in log-steps between the two runs that bracket it. `speedup_wall_*` multiplies
it by AdamW's step time over the optimizer's, measured in the same command on 2 ranks, 1 thread each,
owner-computes (`optimizer_timing.py`).

Targets: NorMuon (with Nesterov, the arm `normuon`) ends at or below Muon at every (size, horizon)
(`normuon_minus_muon_final_val_loss_*`, and the worst of them under the old name; the name is kept
from `bench muon`, the loss is the held-out test split's); its step speed-up
over AdamW is at least 1.3 at the smaller size, both horizons (`speedup_steps_normuon_small_*`); and,
kept from `bench muon`, it reaches AdamW's loss in at most 0.8x the steps at the smaller size's short
horizon (`normuon_steps_to_adamw_loss_ratio`).

Sizes: `full` (the recorded figures; about 70 minutes on 2 cores), `quick` (smaller models, 20 / 80 steps,
all of it in minutes), `smoke` (tests: tiny models, the lrs only, a few steps; measures nothing).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from dist_train.bench import optimizer_space as space
from dist_train.bench.optimizer_study import budgets, run_study, setting_for
from dist_train.bench.report import command_line, document, make_target, pick_size, utc_now
from dist_train.bench.speedup import budget_to_reach, speedup
from dist_train.bench.sweep import mean_sd, ordered

LADDER = (0.25, 0.5, 1, 2, 4)


def _size(models: dict[str, tuple[int, int, int]], block: int, batch: int, short: int, long: int, **rest) -> dict:
    return {"models": models, "block": block, "batch": batch, "horizons": {"short": short, "long": long},
            "ladder": LADDER, "seeds": (0, 1), "held_out": 0.05, "max_bytes": 4_000_000, "eval_batches": 8,
            "tune_axes": None, "retune": ("lr", "adamw_lr"),
            "timing": {"warmup": 5, "measured": 20, "repeats": 3}, **rest}


SIZES: dict[str, dict[str, Any]] = {
    "full": _size({"small": (2, 64, 2), "large": (4, 128, 4)}, 64, 32, 100, 400),
    "quick": _size({"small": (1, 32, 2), "large": (2, 64, 2)}, 64, 16, 20, 80, eval_batches=4, max_bytes=1_000_000,
                   timing={"warmup": 2, "measured": 8, "repeats": 1}),
    "smoke": _size({"small": (1, 16, 2), "large": (1, 32, 2)}, 16, 4, 4, 16, eval_batches=1, max_bytes=100_000,
                   ladder=(1, 4), tune_axes=("lr",), retune=("lr",),
                   timing={"warmup": 1, "measured": 2, "repeats": 1}),
}


def non_embedding_params(size: dict[str, Any], model: str) -> int:
    """Parameters of the transformer blocks (embeddings, output head and final norm left out)."""
    import torch

    from dist_train.models.gpt import GPT

    n_layer, width, n_head = size["models"][model]
    with torch.device("meta"):
        gpt = GPT(vocab_size=256, n_layer=n_layer, width=width, n_head=n_head, block_size=size["block"])
    return sum(p.numel() for name, p in gpt.named_parameters() if name.startswith("blocks."))


# ------------------------------------------------------------------------------- the figures


def _final(runs: list[dict], arm: str, model: str, steps: int, setting: dict) -> dict[str, Any]:
    """Mean and sd over seeds of the final runs of (arm, model, steps) at `setting`."""
    mine = [r for r in runs if (r["arm"], r["model"], r["steps"]) == (arm, model, steps) and r["setting"] == setting]
    failed = sum("error" in r for r in mine)
    if failed:  # a mean over fewer seeds would not compare with the others
        return {"test_loss": None, "test_sd": None, "val_loss": None, "seeds": len(mine), "failed": failed}
    test, test_sd = mean_sd([r["test_loss"] for r in mine])
    return {"test_loss": test, "test_sd": test_sd, "val_loss": mean_sd([r["val_loss"] for r in mine])[0],
            "seeds": len(mine), "failed": 0}


def _ladder(size: dict, tuned: dict, runs: list[dict], arm: str, model: str) -> list[tuple[int, float]]:
    points = []
    for steps in budgets(size, arm):
        loss = _final(runs, arm, model, steps, setting_for(tuned[arm], size, model, steps))["test_loss"]
        points.append((steps, loss if loss is not None else float("inf")))
    return points


def summarize(size: dict, tuned: dict, runs: list[dict], step_s: dict) -> list[dict[str, Any]]:
    """One row per (size, horizon, arm): its tuned setting, final test loss, speed-ups over AdamW."""
    rows = []
    for model in size["models"]:
        for horizon, steps in size["horizons"].items():
            base = _final(runs, "adamw", model, steps, tuned["adamw"][model, horizon].best)
            for arm in space.ARMS:
                descent = tuned[arm][model, horizon]
                row: dict[str, Any] = {"part": "b: final", "size": model, "horizon": horizon, "steps": steps,
                                       "arm": arm, **_final(runs, arm, model, steps, descent.best),
                                       "step_s": step_s[arm, model], "setting": space.describe(descent.best),
                                       "tuning_val_loss": descent.value, "evaluations": descent.evaluations,
                                       "converged": descent.converged,
                                       "at_ladder_end": at_ladder_end(arm, descent.best)}
                if arm in space.MATRIX_ARMS and base["test_loss"] is not None:
                    ladder = _ladder(size, tuned, runs, arm, model)
                    reach = budget_to_reach(ladder, base["test_loss"])
                    row["steps_to_adamw_loss"] = reach.budget
                    row["speedup_steps"], row["speedup_bound"] = speedup(steps, reach)
                    if row["speedup_steps"] is not None:
                        row["speedup_wall"] = row["speedup_steps"] * step_s["adamw", model] / step_s[arm, model]
                    if row["test_loss"] is not None:
                        row["minus_adamw"] = row["test_loss"] - base["test_loss"]
                    row["ladder"] = ladder
                rows.append(row)
    return rows


def _row(rows: list[dict], model: str, horizon: str, arm: str) -> dict[str, Any]:
    return next(r for r in rows if (r["size"], r["horizon"], r["arm"]) == (model, horizon, arm))


def targets_and_reported(size: dict, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    targets, speedups, reported, diffs = [], [], [], []
    small = next(iter(size["models"]))
    for model in size["models"]:
        for horizon in size["horizons"]:
            tag = f"{model}_{horizon}"
            n, m = _row(rows, model, horizon, "normuon"), _row(rows, model, horizon, "muon")
            diff = n["test_loss"] - m["test_loss"] if None not in (n["test_loss"], m["test_loss"]) else None
            diffs.append(diff)
            targets.append(make_target(
                f"normuon_minus_muon_final_val_loss_{tag}", diff, "<=", 0.0,
                f"NorMuon's (Nesterov) final held-out loss - Muon's, each tuned, mean over seeds ({model}, {horizon})"))
            for arm in space.MATRIX_ARMS:
                r = _row(rows, model, horizon, arm)
                bound = {"exact": "", "at_least": " (a lower bound: its shortest run already reached it)",
                         "below": " (none: not reached within 4x the horizon)"}[r.get("speedup_bound", "below")]
                steps_desc = (f"AdamW's steps / {arm}'s steps to AdamW's final held-out loss, each tuned, final "
                              f"losses of own-schedule runs, mean over seeds ({model}, {horizon}){bound}")
                if arm == "normuon" and model == small:
                    speedups.append(make_target(f"speedup_steps_{arm}_{tag}", r.get("speedup_steps"), ">=", 1.3,
                                                steps_desc))
                else:
                    reported.append({"metric": f"speedup_steps_{arm}_{tag}", "value": r.get("speedup_steps"),
                                     "description": steps_desc})
                reported.append({"metric": f"speedup_wall_{arm}_{tag}", "value": r.get("speedup_wall"),
                                 "description": f"speedup_steps x AdamW's step time / {arm}'s (2 ranks, 1 thread "
                                                f"each, owner-computes) ({model}, {horizon})"})
                reported.append({"metric": f"{arm}_minus_adamw_final_loss_{tag}", "value": r.get("minus_adamw"),
                                 "description": f"{arm}'s final held-out loss - AdamW's, each tuned ({model}, {horizon})"})
    targets += speedups
    worst = None if any(d is None for d in diffs) else max(diffs)
    targets.append(make_target("normuon_minus_muon_final_val_loss", worst, "<=", 0.0,
                               "the largest of normuon_minus_muon_final_val_loss_* over sizes and horizons"))
    first = _row(rows, small, "short", "normuon").get("speedup_steps")
    targets.append(make_target("normuon_steps_to_adamw_loss_ratio", 1 / first if first else None, "<=", 0.8,
                               f"1 / speedup_steps_normuon_{small}_short: NorMuon's steps to AdamW's final loss over "
                               "AdamW's, each tuned"))
    return targets, reported


# ------------------------------------------------------------------------------------ the run


def at_ladder_end(arm: str, setting: dict) -> str:
    """The hyperparameters a descent left at an end of its ladder (a zero warm-up or weight decay
    excepted: nothing lies below it): there the best value may lie beyond the ladder."""
    ends = []
    for axis in space.axes(arm):
        value = setting[axis.name]
        if value in (axis.values[0], axis.values[-1]) and value != 0:
            ends.append(f"{axis.name}={value:g} ({'top' if value == axis.values[-1] else 'bottom'})")
    return ", ".join(ends)


def _tuning_record(tuned: dict) -> dict[str, Any]:
    return {f"{arm}/{model}/{horizon}": {"chosen": d.best, "val_loss": d.value, "passes": d.passes,
                                         "converged": d.converged, "evaluations": d.evaluations,
                                         "neighbours": d.neighbours,
                                         "trials": [{"setting": t.setting, "val_loss": t.value} for t in d.trials]}
            for arm, by in tuned.items() for (model, horizon), d in by.items()}


_KEYS = ("part", "size", "horizon", "arm", "test_loss", "test_sd", "minus_adamw", "speedup_steps", "speedup_bound",
         "speedup_wall", "step_s", "setting")


def run(quick: bool) -> dict[str, Any]:
    from dist_train.bench.optimizer_timing import step_times

    size_name, size = pick_size(SIZES, quick)
    command, started = command_line(), utc_now()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dist-train-bench-optimizers-") as run_dir:
        tuned, runner = run_study(size, run_dir)
        t1 = time.perf_counter()
        step_s, timing_rows = step_times(size, run_dir)  # after the study's pool is gone: nothing else runs
        t_timing = time.perf_counter() - t1
    runs = runner.runs()
    rows = summarize(size, tuned, runs, step_s)
    targets, reported = targets_and_reported(size, rows)
    timing = [{"part": "a: step time", **r} for r in timing_rows]
    setup = {"size": size_name, **{k: v for k, v in size.items() if k != "models"},
             "models": {m: {"n_layer": l, "width": w, "n_head": h, "non_embedding_params": non_embedding_params(size, m)}
                        for m, (l, w, h) in size["models"].items()},
             "tokens_per_step": size["batch"] * size["block"],
             "axes": {arm: {a.name: list(a.values) for a in space.axes(arm)} for arm in space.ARMS},
             "starts": {arm: space.start(arm) for arm in space.ARMS},
             "tuning": _tuning_record(tuned), "runs": len(runs), "timing_s": t_timing,
             "seconds": time.perf_counter() - t0}
    return document("optimizers", command, started, setup, [*timing, *(ordered(r, _KEYS) for r in rows)],
                    targets, reported)


def write_artifacts(result: dict[str, Any], json_path: Path) -> Optional[Path]:
    """The speed-up plot next to the JSON (same name, .png); None when matplotlib is missing."""
    from dist_train.bench.optimizers_plot import plot_speedups

    return plot_speedups(result, json_path.with_suffix(".png"))

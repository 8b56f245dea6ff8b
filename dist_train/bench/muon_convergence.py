"""Part (b) of `dist-train bench muon`: AdamW vs Muon vs NorMuon convergence on the byte-level GPT.

Every run is the framework's own end-to-end training (`dist_train.train.loop.train`, what
`dist-train run` calls) in one process: `parallel.backend=none`, `parallel.stages=1`, CPU, one
thread. Every arm (below) trains the quickstart's GPT (4 layers x 128, 4 heads, context 64) on
the stdlib_bytes corpus with the same steps (300), batch (32), warm-up (20), cosine schedule (floor 0.1),
gradient clipping (1.0), no weight decay, and the same seeds: a seed fixes the initial weights and
the batch order, so every arm sees identical batches and starts from identical weights.

Same tuning effort for each: 3 peak lrs, each over the same seeds. Four arms:
  adamw          optim.lr in the AdamW grid (every parameter).
  muon           optim.lr = the hidden matrices' lr (Keller's scale sqrt(max(1, m/n)), Nesterov, mu 0.95);
                 the AdamW groups (embedding, output head, norms, biases) at `optim.matrix.adamw_lr` fixed
                 to the middle of the AdamW grid.
  normuon        optim.lr = the matrices' lr, the paper's update rule (update RMS 0.2 * lr) with Nesterov
                 momentum (`optim.matrix.nesterov=true`, as in the authors' code and Muon's default) and
                 its AdamW groups exactly as Muon's: the two matrix rules then differ only in NorMuon's
                 per-neuron normalisation and step size. The targets compare this arm.
  normuon_paper  the paper's Algorithm 1 as written, momentum without Nesterov (NorMuon's default):
                 reported beside the others, not a target. Nesterov is worth ~0.06 of final loss here,
                 so comparing it against Nesterov-Muon would measure the momentum form, not NorMuon.
(An earlier version let NorMuon's lr drive its AdamW groups too; that is no longer done: equal footing.)
Each grid is centred on its optimizer's best in a wider exploratory sweep (see FULL_GRIDS); a summary
row says `bracketed: no` when its best lr is at an edge of its grid all the same.

The validation loss is evaluated every 1/10 of the run on a fixed set of validation windows (the
same windows at every evaluation and in every run, so differences between optimizers are not
sampling noise of the validation set). The best lr of an optimizer is the one with the lowest final
validation loss averaged over seeds (`local_methods.choose_lr`); at that lr, its mean curve over
seeds is read for the first step at which it reaches AdamW-best's final mean loss, interpolating
linearly between evaluation points (`steps_to_loss`).

Targets: NorMuon reaches AdamW's final loss in <= 0.8x AdamW's steps
(`normuon_steps_to_adamw_loss_ratio`, unmet when never reached) and ends at or below Muon's final
loss (`normuon_minus_muon_final_val_loss`, each at its best lr, mean over seeds).

Sizes: `full` (the recorded figures, ~30 min of 2 cores), `quick` (the same GPT, 80 steps, 1 seed,
2 lrs per optimizer: ~2 min), `smoke` (tests: tiny model, a few steps; measures nothing), `explore` (one
seed, 200 steps, 4 lrs a factor ~3 apart per optimizer: where FULL_GRIDS came from; set
DIST_TRAIN_BENCH_SIZE=explore).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

from dist_train.bench._spawn import one_thread_env
from dist_train.bench.report import make_target, pick_size
from dist_train.bench.sweep import choose_lr, mean_sd, ordered

# arm -> (optim.name, its overrides); see the docstring for why each is set as it is.
ARMS: dict[str, tuple[str, list[str]]] = {
    "adamw": ("adamw", []),
    "muon": ("muon", []),
    "normuon": ("normuon", ["optim.matrix.nesterov=true"]),
    "normuon_paper": ("normuon", ["optim.matrix.nesterov=false"]),
}
OPTIMIZERS = tuple(ARMS)
WORKERS = 2  # one per core of the 2-core reference machine; one thread each
EVALS = 10  # validation points per run: every 1/10 of the steps

# Every run: CPU, one thread, single process, nothing written that the figures do not need.
_COMMON = ["runtime.device=cpu", "runtime.threads=1", "parallel.backend=none", "parallel.stages=1",
           "checkpoint.every=0", "checkpoint.at_end=false", "checkpoint.resume=never", "telemetry.tensorboard=false",
           'telemetry.progress="off"', "telemetry.energy=none", "train.sample_tokens=0", "train.grad_accum=1",
           "train.grad_clip=1.0", "optim.schedule=cosine", "optim.min_lr_ratio=0.1", "optim.weight_decay=0.0",
           "model.dropout=0.0"]
QUICKSTART_GPT = ["model.name=gpt", "model.n_layer=4", "model.width=128", "model.n_head=4", "model.block_size=64",
                  "data.name=stdlib_bytes", "data.max_bytes=4000000", "data.val_fraction=0.1"]
TINY_GPT = ["model.name=gpt", "model.n_layer=2", "model.width=16", "model.n_head=2", "model.block_size=8",
            "data.name=stdlib_bytes", "data.max_bytes=100000", "data.val_fraction=0.1"]

# Each optimizer's grid: 3 lrs a factor 2 apart around its best in a wider exploratory sweep
# (size `explore`: 4 lrs a factor ~3 apart, seed 0, 200 steps; final val loss by lr)
#   adamw    1e-3: 2.310   3e-3: 2.224   1e-2: 2.642   3e-2: 2.725
#   muon     0.01: 1.996   0.02: 1.821   0.05: 1.758   0.1:  2.106   (AdamW groups at 3e-3)
#   normuon  1e-3: 2.269   3e-3: 2.051   1e-2: 1.756   3e-2: 1.830
# so each optimizer gets the same effort: 3 lrs, spaced alike, centred on its own optimum. At the
# full length (300 steps) Muon's best moved down to the lower edge of {0.025, 0.05, 0.1} (mean final
# 1.529 / 1.591 / 2.173), so its grid was shifted down one notch (0.0125: 1.656); AdamW's and
# NorMuon's stayed inside theirs. (That sweep's NorMuon was the paper rule without Nesterov; the
# Nesterov arm keeps the same grid: two full-length probes at seed 0 put its best inside it, 1e-2:
# 1.484, 1.4e-2: 1.494.)
FULL_GRIDS = {"adamw": [1.5e-3, 3e-3, 6e-3], "muon": [0.0125, 0.025, 0.05], "normuon": [5e-3, 1e-2, 2e-2],
              "normuon_paper": [5e-3, 1e-2, 2e-2]}
EXPLORE_GRIDS = {"adamw": [1e-3, 3e-3, 1e-2, 3e-2], "muon": [0.01, 0.02, 0.05, 0.1],
                 "normuon": [1e-3, 3e-3, 1e-2, 3e-2], "normuon_paper": [1e-3, 3e-3, 1e-2, 3e-2]}


def _size(model: list[str], batch: int, steps: int, warmup: int, eval_batches: int, grids: dict[str, list[float]],
          seeds: list[int], adamw_lr: float) -> dict[str, Any]:
    return {"model": model, "batch": batch, "steps": steps, "warmup_steps": warmup, "eval_batches": eval_batches,
            "grids": grids, "seeds": seeds, "muon_adamw_lr": adamw_lr}


# Full: the quickstart's GPT, batch, steps (300) and warm-up (20); 90-125 CPU-s a run on the 2-core
# reference machine, 24 runs two at a time: ~30 min. Validation: 8 batches of 32 windows of 64 bytes (16k
# predictions), the same windows at each of the 10 evaluations.
SIZES: dict[str, dict[str, Any]] = {
    "full": _size(QUICKSTART_GPT, 32, 300, 20, 8, FULL_GRIDS, [0, 1], FULL_GRIDS["adamw"][1]),
    # The same model, 80 steps, the upper two lrs of each grid (short runs favour higher lrs): ~2 min.
    "quick": _size(QUICKSTART_GPT, 32, 80, 8, 4, {o: g[1:] for o, g in FULL_GRIDS.items()}, [0],
                   FULL_GRIDS["adamw"][1]),
    # tests: tiny model, a few steps; proves the benchmark runs and reports, measures nothing
    "smoke": _size(TINY_GPT, 4, 10, 2, 1, {"adamw": [1e-3, 1e-2], "muon": [0.01, 0.05], "normuon": [1e-3, 1e-2],
                             "normuon_paper": [1e-3, 1e-2]}, [0], 3e-3),
    "explore": _size(QUICKSTART_GPT, 32, 200, 20, 8, EXPLORE_GRIDS, [0], 3e-3),
}


def eval_every(size: dict[str, Any]) -> int:
    return max(1, size["steps"] // EVALS)


def run_overrides(size: dict[str, Any], optimizer: str, lr: float) -> list[str]:
    """The exact overrides (over _COMMON and the built-in defaults) of one run, less its seed."""
    name, settings = ARMS[optimizer]
    opt = [f"optim.name={name}", *settings, f"optim.lr={lr}"]
    if name in ("muon", "normuon"):
        opt.append(f"optim.matrix.adamw_lr={size['muon_adamw_lr']}")
    every = eval_every(size)
    return [*size["model"], f"train.batch_size={size['batch']}", f"train.steps={size['steps']}",
            f"optim.warmup_steps={size['warmup_steps']}", f"train.eval_every={every}", f"train.log_every={every}",
            f"train.eval_batches={size['eval_batches']}", *opt]


# ------------------------------------------------------------------------------------ the curve


def steps_to_loss(curve: Sequence[tuple[float, float]], target: float) -> Optional[float]:
    """The first step at which a validation curve [(step, loss), ...] reaches `target` (loss <= target),
    linearly interpolated between the evaluation before and the one at which it is reached. Reached
    at the first evaluation already: that evaluation's step (nothing was measured before it, so this
    is an upper bound). Never reached (or no curve): None."""
    prev: Optional[tuple[float, float]] = None
    for step, loss in sorted(curve):
        if not math.isfinite(loss):
            return None  # diverged: nothing after a NaN counts
        if loss <= target:
            if prev is None:
                return float(step)
            (s0, l0), (s1, l1) = prev, (step, loss)
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
        prev = (step, loss)
    return None


def mean_curve(runs: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """The validation curve averaged over runs (seeds) at the evaluation steps they all have."""
    steps = sorted(set.intersection(*(set(s for s, _ in r["curve"]) for r in runs))) if runs else []
    return [(s, statistics.fmean(dict(r["curve"])[s] for r in runs)) for s in steps]


# ------------------------------------------------------------------------------------------ runs


def _warm_worker() -> None:
    """Import what every run uses up front (one thread), so no run's time includes a first import."""
    import torch

    import dist_train.optim  # noqa: F401
    import dist_train.train.loop  # noqa: F401

    torch.set_num_threads(1)


def _job(job: dict[str, Any]) -> dict[str, Any]:
    """One training run in a pool worker: `loop.train` in this process, then its evaluations read
    back from the run's metrics.jsonl. A crash is a row with `error`, not a crashed benchmark."""
    import torch

    from dist_train.config import load_config
    from dist_train.runtime import discover, init_distributed
    from dist_train.train.loop import train

    torch.set_num_threads(1)
    key = {k: job[k] for k in ("optimizer", "lr", "seed")}
    name = f"{job['optimizer']}-{job['lr']}-{job['seed']}"
    try:
        cfg = load_config(None, [*_COMMON, *job["overrides"], f"train.seed={job['seed']}",
                                 f"run.dir={job['run_dir']}", f"run.name={name}"])
        ctx = init_distributed(cfg, discover({}))
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            last = train(cfg, ctx, ["dist-train", "bench", "muon", name])
        finally:
            ctx.destroy()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    except Exception as e:  # a finding for the table, not a crash of the whole benchmark
        return {**key, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    records = [json.loads(line) for line in (Path(job["run_dir"]) / name / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    curve = [(int(r["step"]), float(r["val_loss"])) for r in records if r.get("val_loss") is not None]
    return {**key, "val_loss": float(last["val_loss"]), "train_loss": float(last["loss"]), "curve": curve,
            "wall_s": wall, "cpu_s": cpu}


def _sweep(size: dict[str, Any], run_dir: str) -> list[dict[str, Any]]:
    # Optimizers interleaved (seed, lr index, optimizer) so each shares the cores with the others alike.
    width = max(len(g) for g in size["grids"].values())
    jobs = [{"optimizer": opt, "lr": size["grids"][opt][i], "seed": seed, "run_dir": run_dir,
             "overrides": run_overrides(size, opt, size["grids"][opt][i])}
            for seed in size["seeds"] for i in range(width) for opt in OPTIMIZERS if i < len(size["grids"][opt])]
    runs = []
    with one_thread_env(), ProcessPoolExecutor(max_workers=WORKERS, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=_warm_worker) as pool:
        for i, run in enumerate(pool.map(_job, jobs, chunksize=1)):
            runs.append(run)
            print(f"  muon convergence: {i + 1}/{len(jobs)} runs ({run['optimizer']} lr {run['lr']} seed "
                  f"{run['seed']}: {run.get('error') or format(run['val_loss'], '.4f')})", file=sys.stderr, flush=True)
    return runs


# ------------------------------------------------------------------------------- rows, targets


_RUN_KEYS = ("part", "optimizer", "lr", "seed", "val_loss", "train_loss", "wall_s", "cpu_s", "error")
_SUMMARY_KEYS = ("part", "optimizer", "lr", "bracketed", "val_loss", "val_sd", "steps_to_adamw_loss", "steps_ratio",
                 "steps", "cpu_s", "failed_runs", "error")


def summarize(size: dict[str, Any], runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(summary rows, one per optimizer at its best lr, in OPTIMIZERS order; the targets)."""
    best: dict[str, dict[str, Any]] = {}
    for opt in OPTIMIZERS:
        mine = [r for r in runs if r["optimizer"] == opt]
        lr, by_lr = choose_lr(mine, lm=True)
        grid = size["grids"][opt]
        row: dict[str, Any] = {"part": "b: convergence", "optimizer": opt, "lr": lr, "steps": size["steps"]}
        if lr is None:
            errors = sorted({r["error"] for r in mine if "error" in r})
            row["error"] = errors[0] if errors else "no finite validation loss"
        else:
            chosen = [r for r in mine if r["lr"] == lr]
            row["val_loss"], row["val_sd"] = mean_sd([r["val_loss"] for r in chosen])
            row["bracketed"] = grid[0] < lr < grid[-1] if len(grid) >= 3 else None  # 2 lrs: no inside
            row["cpu_s"] = statistics.fmean(r["cpu_s"] for r in chosen)
            row["curve"] = mean_curve(chosen)
            failed = sum("error" in r for r in mine)
            if failed:
                row["failed_runs"] = failed
        row["val_by_lr"] = {str(k): v["val_loss"] for k, v in by_lr.items()}
        row["overrides"] = run_overrides(size, opt, lr) if lr is not None else None
        best[opt] = row
    target_loss = best["adamw"].get("val_loss")
    for row in best.values():
        if target_loss is not None and row.get("curve"):
            row["steps_to_adamw_loss"] = steps_to_loss(row["curve"], target_loss)
            if row["steps_to_adamw_loss"] is not None:
                row["steps_ratio"] = row["steps_to_adamw_loss"] / size["steps"]
    rows = [ordered(best[o], _SUMMARY_KEYS) for o in OPTIMIZERS]
    normuon, muon = best["normuon"], best["muon"]
    diff = (normuon["val_loss"] - muon["val_loss"]
            if normuon.get("val_loss") is not None and muon.get("val_loss") is not None else None)
    targets = [
        make_target("normuon_steps_to_adamw_loss_ratio", normuon.get("steps_ratio"), "<=", 0.8,
                    "steps NorMuon (arm normuon: Nesterov like Muon; best lr, mean val curve over seeds, linear "
                    "between evaluations) takes to reach AdamW-best's final mean val loss / AdamW's steps; none = "
                    "never reached"),
        make_target("normuon_minus_muon_final_val_loss", diff, "<=", 0.0,
                    "NorMuon's final val loss (arm normuon: Nesterov like Muon) - Muon's, each at its best lr, "
                    "mean over seeds"),
    ]
    return rows, targets


def convergence(quick: bool) -> tuple[list[dict], list[dict], dict]:
    """Run part (b): (result rows, targets, setup). Rows: the summary per optimizer at its best lr
    (part `b: convergence`), then one per (optimizer, lr, seed) (part `b: runs`)."""
    size_name, size = pick_size(SIZES, quick)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dist-train-bench-muon-") as run_dir:
        runs = _sweep(size, run_dir)
    wall = time.perf_counter() - t0
    summary, targets = summarize(size, runs)
    run_rows = [ordered({"part": "b: runs", **r}, _RUN_KEYS)
                for r in sorted(runs, key=lambda r: (OPTIMIZERS.index(r["optimizer"]), r["lr"], r["seed"]))]
    setup = {"size": size_name, "model": [o for o in size["model"] if o.startswith("model.")],
             "data": [o for o in size["model"] if o.startswith("data.")],
             "steps": size["steps"], "batch": size["batch"], "warmup_steps": size["warmup_steps"],
             "schedule": "cosine to 0.1x peak after linear warm-up", "seeds": size["seeds"],
             "grids": size["grids"], "muon_adamw_lr": size["muon_adamw_lr"],
             "normuon_adamw_lr": size["muon_adamw_lr"],
             "eval_every": eval_every(size), "eval_batches": size["eval_batches"], "threads": 1, "workers": WORKERS,
             "common_overrides": _COMMON, "runner": "dist_train.train.loop.train, parallel.backend=none, one process",
             "selection": "best lr per optimizer: lowest final val loss, mean over seeds",
             "wall_s": wall, "runs": len(runs)}
    return [*summary, *run_rows], targets, setup

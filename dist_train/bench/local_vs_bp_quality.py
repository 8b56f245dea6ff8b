"""The quality part of `dist-train bench local-vs-bp`: final validation loss (GPT) and accuracy
(digits, MLP 4 x 128) of the local pipeline (DGL) against end-to-end BP, each over an lr sweep and
several seeds; each method's lr is the one with the best mean validation figure.

Both methods take the same update as in the throughput part: the global batch in MICRO_BATCHES
micro-batches (train.grad_accum), gradients accumulated, one step. BP runs `loop.train` (backend
none); the local figures come from the sequential-stage reference (`local_reference`: both stages
in one process, one after the other), which tests/test_local_pipeline.py proves step-for-step
equal to the 2-rank pipeline (and tests/test_bench_local.py checks against `train_local` on 2
ranks). Jobs run two at a time, one thread each.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from dist_train.bench._spawn import one_thread_env as _one_thread_env
from dist_train.bench.local_vs_bp_runs import MICRO_BATCHES, PRELOAD, WORLD, config
from dist_train.train.local_reference import local_reference

TASKS = ("gpt", "digits")
QUALITY_METHODS = ("bp", "local")


def quality_job(job: dict[str, Any]) -> dict[str, Any]:
    """One training run for the quality table (runs in a pool worker with one thread)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    overrides = [*job["model"], f"train.steps={job['steps']}", f"optim.warmup_steps={job['warmup_steps']}",
                 f"train.eval_batches={job['eval_batches']}", f"optim.lr={job['lr']}", f"train.seed={job['seed']}",
                 f"train.log_every={min(10, job['steps'])}", f"run.dir={job['run_dir']}",
                 f"train.grad_accum={MICRO_BATCHES}",  # the same micro-batches as the throughput part
                 f"run.name={job['task']}-{job['method']}-{job['lr']}-{job['seed']}"]
    if job["method"] == "local":
        cfg = config([*overrides, "parallel.backend=none", "parallel.stages=2", "local.method=dgl"])
        res = local_reference(cfg)
        tail = res["losses"][-1][-min(10, job["steps"]):]  # the last stage's task loss, last window
        metrics = {"val_loss": res["val_loss"], "val_acc": res.get("val_acc"), "train_loss": statistics.fmean(tail)}
    else:
        from dist_train.runtime import discover, init_distributed
        from dist_train.train.loop import train

        cfg = config([*overrides, "parallel.backend=none"])
        ctx = init_distributed(cfg, discover({}))
        last = train(cfg, ctx, ["dist-train", "bench", "local-vs-bp", "quality"])
        metrics = {"val_loss": last["val_loss"], "val_acc": last.get("val_acc"), "train_loss": last["loss"]}
    metrics["micro_batch"] = cfg.train.batch_size // cfg.train.grad_accum
    return {**{k: job[k] for k in ("task", "method", "lr", "seed")}, **metrics,
            "wall_s": time.perf_counter() - t0}




def run_quality(size: dict[str, Any], run_dir: str) -> list[dict[str, Any]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for task in TASKS:  # the long GPT jobs first; BP and local alternate
        spec = size[task]
        for seed in spec["seeds"]:
            for lr in spec["lrs"]:
                for method in QUALITY_METHODS:
                    jobs.append({**{k: spec[k] for k in ("model", "steps", "warmup_steps", "eval_batches")},
                                 "task": task, "method": method, "lr": lr, "seed": seed, "run_dir": run_dir})
    # forkserver: the same server the throughput runs were forked from (torch already imported).
    multiprocessing.set_forkserver_preload(list(PRELOAD))
    with _one_thread_env(), ProcessPoolExecutor(max_workers=WORLD,
                                                mp_context=multiprocessing.get_context("forkserver")) as pool:
        return list(pool.map(quality_job, jobs))


def quality_rows(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict]]:
    """Mean and sd over seeds per (task, method, lr); each method's best lr on validation."""
    rows, best = [], {}
    for task in TASKS:
        for method in QUALITY_METHODS:
            cells = []
            for lr in sorted({r["lr"] for r in runs if r["task"] == task and r["method"] == method}):
                mine = [r for r in runs if r["task"] == task and r["method"] == method and r["lr"] == lr]
                loss = [r["val_loss"] for r in mine]
                acc = [r["val_acc"] for r in mine if r["val_acc"] is not None]
                cells.append({"part": task, "repeat": f"{len(mine)} seeds", "method": method,
                              "mb": mine[0]["micro_batch"], "loss": statistics.fmean(r["train_loss"] for r in mine), "lr": lr,
                              "val_loss": statistics.fmean(loss),
                              "val_sd": statistics.stdev(loss) if len(loss) > 1 else 0.0,
                              "val_acc": statistics.fmean(acc) if acc else None,
                              "acc_sd": (statistics.stdev(acc) if len(acc) > 1 else 0.0) if acc else None,
                              "chosen": False})
            # GPT: lowest validation loss; digits: highest accuracy, then lowest loss.
            key = (lambda c: c["val_loss"]) if task == "gpt" else (lambda c: (-c["val_acc"], c["val_loss"]))
            chosen = min(cells, key=key)
            chosen["chosen"] = True
            best[f"{task}/{method}"] = chosen
            rows.extend(cells)
    return rows, best



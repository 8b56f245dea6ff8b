"""`dist-train bench local-methods`: every local-learning method against tuned backprop, in one run.

Three parts, every figure measured in this run.

Sweep (the table): every method (`local.method`) x K in {2, 4} stages x task, and end-to-end BP
on each task, at an equal number of optimizer steps, batch, data and architecture. Tasks:

  digits-mlp    scikit-learn digits (60/20/20 train/val/test), MLP 4 x 64
  digits-cnn    digits, CNN 4 blocks x 32 channels                      <- the targets are here
  shapes32-cnn  shapes32 (`dist_train/data/shapes32.py`: generated 32x32 RGB shapes, 10 classes,
                5000/1000/1000), CNN 4 blocks x 32 channels (stride-4 stem: blocks run at 8x8)
  gpt-bytes     byte-level GPT 4 layers x 64, 4 heads, context 32, on the stdlib_bytes corpus
                (2 MB; 80/10/10 interleaved chunks)

Fair comparison (same budget and tuning for every method): for every (method, K, task) and for BP, the same lr grid
is swept, each lr over the same >= 3 seeds; the lr is chosen on the *validation* split by the mean
over seeds (classifiers: highest accuracy, ties to lower loss; GPT: lowest loss), and the row
reports the *test* split at that lr: mean and sd over seeds. The test split never enters the choice.
Every run is the sequential reference `local_reference` (all stages in one process, one after the
other), which tests/test_local_pipeline.py proves equal step for step to the multi-rank pipeline.
BP is the same code path with `parallel.stages=1` (one stage, no auxiliary head: the task loss
back-propagated through the whole model); tests/test_bench_methods.py proves it equal step for
step to the framework's BP loop `dist_train.train.loop.train` with backend none. Runs go two at a
time in a process pool (workers forked from a server that imported torch once), one thread each.
A method that cannot run a configuration (its config error, or a crash while the methods are being
rewritten) gets a row with `error` set and no figures.

  gap_pts   BP test accuracy - the method's, in percentage points (classifiers; mean over seeds)
  loss_x    the method's test loss / BP's (GPT)
  cpu_s     CPU seconds per run at the chosen lr (training and evaluation; unlike wall time, not
            inflated by other tenants of a shared machine)

Pipeline: one configuration per method, K = 2 on digits-mlp at the lr the sweep chose, seed 0, on
the real 2-rank pipeline (`dist_train.train.local_loop.train_local`, 2 gloo ranks, one thread
each), beside the sequential reference's figures for the same configuration (the sweep's seed-0
run). Asynchronous modes, MAN's weight messages and thread timing are where they may differ.

Asynchronous vs synchronous: GPT 6 layers x 64 on 2 ranks cut at block 4, so stage 0 (embedding,
4 blocks, DGL head) does about twice the work of stage 1 (2 blocks, head). The ~2x is measured, not
assumed: `cost_ratio` times every block's forward + backward on one batch, one thread, median of 15
interleaved rounds (1.9 on the reference machine); `busy_ratio` is the same ratio from the runs'
own busy times (compute only, as the stages log it; noisier on a shared machine). The slow
stage is the *first* one on purpose: replay (local.asynchronous=true) lets a stage that waits for
its input train on a replayed batch instead of idling, and only a stage after a slower one waits
(with the slow stage last, nothing ever waits but stage 0 on back-pressure, which has no replay,
so both modes would run the same arithmetic). Reported: samples/s of the slower stage over the
logged windows after warm-up (`<run>/stages/stage<k>/metrics.jsonl`), each stage's idle fraction,
replayed updates, and the final validation loss; modes alternate (S A A S ...), median over repeats.

Sizes: `full` (the recorded table), `quick` (the same comparison, fewer steps, lrs and seeds:
a few minutes), `smoke` (tests: tiny models, a couple of steps; measures nothing). Every row
records its exact config overrides (applied over the built-in quickstart config).
"""

from __future__ import annotations

import math
import multiprocessing
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

from dist_train.bench._spawn import one_thread_env as _one_thread_env
from dist_train.bench.report import command_line, document, make_target, pick_size, utc_now
from dist_train.bench.sweep import choose_lr, mean_sd, ordered
from dist_train.bench.windows import after_warmup, read_jsonl

METHODS = ("dgl", "mono_forward", "infopro", "auglocal", "man", "forward_forward", "tpsgd", "noprop")
TARGETED = ("dgl", "infopro", "auglocal", "man")  # the methods with an accuracy-gap target
KS = (2, 4)
TARGET_TASK = "digits-cnn"
TARGETS = {2: ("<=", 1.0), 4: ("<=", 3.0)}  # gap in points: BP test acc - the method's, by K
WORKERS = 2  # one per core of the 2-core reference machine; one thread each
# What the fork server every worker (sweep pool, pipeline ranks) is forked from imports once: torch's
# import is then paid once per benchmark, not by every worker's fresh interpreter.
PRELOAD = ("torch", "torch.distributed", "dist_train.local.methods", "dist_train.train.local_reference",
           "dist_train.train.local_loop")

# Every run: CPU, one thread, nothing written that the figures do not need.
_COMMON = ["runtime.device=cpu", "runtime.threads=1", "train.eval_every=0", "train.sample_tokens=0",
           "checkpoint.every=0", "checkpoint.at_end=false", "checkpoint.resume=never",
           "telemetry.tensorboard=false", 'telemetry.progress="off"', "telemetry.energy=none",
           "local.send_targets=false", "train.grad_accum=1", "train.grad_clip=1.0", "optim.name=adamw",
           "optim.schedule=cosine", "model.dropout=0.0"]

_DIGITS = ["data.name=digits", "data.val_fraction=0.2", "data.test_fraction=0.2", "train.batch_size=32"]
_SHAPES = ["data.name=shapes32", "data.num_examples=7000", "data.val_fraction=0.142857",
           "data.test_fraction=0.142857", "train.batch_size=32"]  # 5000 / 1000 / 1000 images
_BYTES = ["data.name=stdlib_bytes", "data.max_bytes=2000000", "data.val_fraction=0.1", "data.test_fraction=0.1",
          "train.batch_size=16"]


def _task(model: list[str], data: list[str], steps: int, warmup: int, eval_batches: int, lrs: list[float],
          seeds: list[int]) -> dict[str, Any]:
    return {"overrides": [*model, *data], "steps": steps, "warmup_steps": warmup, "eval_batches": eval_batches,
            "lrs": lrs, "seeds": seeds}


_MLP = ["model.name=mlp", "model.n_layer=4", "model.width=64"]
_CNN = ["model.name=cnn", "model.n_layer=4", "model.width=32"]
_GPT = ["model.name=gpt", "model.n_layer=4", "model.width=64", "model.n_head=4", "model.block_size=32"]
# Validation: 11 batches of 32 = 352 of digits' 359 val images; 31 x 32 = 992 of shapes32's 1000
# (whole batches: the epoch sampler would repeat images to fill a last partial one). The test
# split is always evaluated whole (classifiers).
# Full: 3 lrs a factor ~3 apart around each task's usual optimum (the same grid for BP and every
# method), 3 seeds; step counts sized so the whole benchmark takes ~30 minutes of 2 cores
# (measured CPU per step: MLP ~8 ms, the CNNs ~30-35 ms, GPT ~60 ms, by method and K).
_SEEDS = [0, 1, 2]

# The async-vs-sync part: stage 0 (embedding + 4 blocks + DGL head) ~2x stage 1 (2 blocks + head).
_ASYNC_MODEL = ["model.name=gpt", "model.n_layer=6", "model.width=64", "model.n_head=4", "model.block_size=32",
                "parallel.cut_points=[4]", *_BYTES, "parallel.stages=2", "local.method=dgl", "optim.lr=3e-3",
                "optim.warmup_steps=10", "train.eval_batches=16"]

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "tasks": {
            "digits-mlp": _task(_MLP, _DIGITS, 200, 20, 11, [3e-3, 1e-2, 3e-2], _SEEDS),
            "digits-cnn": _task(_CNN, _DIGITS, 400, 20, 11, [1e-3, 3e-3, 1e-2], _SEEDS),
            "shapes32-cnn": _task(_CNN, _SHAPES, 160, 20, 31, [1e-3, 3e-3, 1e-2], _SEEDS),
            "gpt-bytes": _task(_GPT, _BYTES, 80, 10, 16, [3e-3, 1e-2, 3e-2], _SEEDS),
        },
        "pipeline": {"task": "digits-mlp", "k": 2, "seed": 0, "group": 1},
        "async": {"overrides": _ASYNC_MODEL, "warmup": 10, "measured": 60, "log_every": 10, "repeats": 2},
    },
    "quick": {
        "tasks": {
            "digits-mlp": _task(_MLP, _DIGITS, 120, 10, 11, [3e-3, 1e-2], [0, 1]),
            "digits-cnn": _task(_CNN, _DIGITS, 60, 10, 11, [3e-3, 1e-2], [0, 1]),
            "shapes32-cnn": _task(_CNN, _SHAPES, 40, 10, 31, [3e-3, 1e-2], [0, 1]),
            "gpt-bytes": _task(_GPT, _BYTES, 30, 5, 8, [3e-3, 1e-2], [0, 1]),
        },
        "pipeline": {"task": "digits-mlp", "k": 2, "seed": 0, "group": len(METHODS)},
        "async": {"overrides": _ASYNC_MODEL, "warmup": 5, "measured": 20, "log_every": 5, "repeats": 2},
    },
    # tests: tiny models, two steps; proves the benchmark runs and reports, measures nothing
    "smoke": {
        "tasks": {
            "digits-mlp": _task(["model.name=mlp", "model.n_layer=4", "model.width=16"], _DIGITS, 2, 1, 2,
                                [1e-3, 1e-2], [0]),
            "digits-cnn": _task(["model.name=cnn", "model.n_layer=4", "model.width=8"], _DIGITS, 2, 1, 2,
                                [1e-3, 1e-2], [0]),
            "shapes32-cnn": _task(["model.name=cnn", "model.n_layer=4", "model.width=8"],
                                  ["data.name=shapes32", "data.num_examples=300", "data.val_fraction=0.2",
                                   "data.test_fraction=0.2", "train.batch_size=8"], 2, 1, 2, [1e-3, 1e-2], [0]),
            "gpt-bytes": _task(["model.name=gpt", "model.n_layer=4", "model.width=16", "model.n_head=2",
                                "model.block_size=8"],
                               ["data.name=stdlib_bytes", "data.max_bytes=100000", "data.val_fraction=0.1",
                                "data.test_fraction=0.1", "train.batch_size=4"], 2, 1, 2, [1e-3, 1e-2], [0]),
        },
        "pipeline": {"task": "digits-mlp", "k": 2, "seed": 0, "group": len(METHODS)},
        "async": {"overrides": ["model.name=gpt", "model.n_layer=3", "model.width=16", "model.n_head=2",
                                "model.block_size=8", "parallel.cut_points=[2]", "data.name=stdlib_bytes",
                                "data.max_bytes=100000", "train.batch_size=4", "parallel.stages=2",
                                "local.method=dgl", "optim.warmup_steps=1", "train.eval_batches=1"],
                  "warmup": 2, "measured": 2, "log_every": 2, "repeats": 1},
    },
}
# Hidden knob for the test suite: DIST_TRAIN_BENCH_SIZE=smoke overrides --quick / full.


def _config(overrides: list[str]):
    from dist_train.config import load_config

    return load_config(None, [*_COMMON, *overrides])


def _is_lm(task: str) -> bool:
    return task.startswith("gpt")


def method_overrides(method: str, k: int) -> list[str]:
    """BP: one stage (the task loss through the whole model); a method: K stages of it."""
    if method == "bp":
        return ["parallel.stages=1", "local.method=dgl"]
    return [f"parallel.stages={k}", f"local.method={method}"]


def run_overrides(spec: dict[str, Any], method: str, k: int, lr: float) -> list[str]:
    """The exact overrides (over _COMMON and the quickstart) of one sweep run, less its seed."""
    return [*spec["overrides"], *method_overrides(method, k), f"train.steps={spec['steps']}",
            f"optim.warmup_steps={spec['warmup_steps']}", f"train.eval_batches={spec['eval_batches']}",
            f"train.log_every={min(10, spec['steps'])}", f"optim.lr={lr}", "parallel.backend=none"]


# ---------------------------------------------------------------------------------------- sweep


_DATA: dict[tuple[str, int], Any] = {}  # a pool worker's data sets, built once (a few per benchmark)


def _dataset(cfg):
    from dist_train.data import build_dataset

    key = (cfg.data.model_dump_json(), cfg.model.block_size)
    if key not in _DATA:
        _DATA[key] = build_dataset(cfg.data, cfg.model.block_size)
    return _DATA[key]


def _warm_worker() -> None:
    """Import what every run uses up front, so no run's time includes a first import."""
    import importlib

    import torch

    for module in ("dist_train.local.methods", "dist_train.train.local_reference"):
        importlib.import_module(module)
    torch.set_num_threads(1)


def _sweep_job(job: dict[str, Any]) -> dict[str, Any]:
    """One sweep run in a pool worker (one thread): the sequential reference, or an error."""
    import torch

    from dist_train.train.local_reference import local_reference

    torch.set_num_threads(1)
    key = {k: job[k] for k in ("task", "method", "k", "lr", "seed")}
    try:
        cfg = _config([*job["overrides"], f"train.seed={job['seed']}", f"run.dir={job['run_dir']}",
                       f"run.name={job['task']}-{job['method']}-{job['k']}-{job['lr']}-{job['seed']}"])
        data = _dataset(cfg)  # built once per worker: not billed to the run
        t0, c0 = time.perf_counter(), time.process_time()
        res = local_reference(cfg, data)
    except Exception as e:  # a finding for the table (config error, or a method mid-rewrite), not a crash
        return {**key, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    tail = res["losses"][-1][-min(10, len(res["losses"][-1])):]  # the last stage's loss, last window
    out = {**key, "train_loss": statistics.fmean(tail)}
    for name in ("val_loss", "val_acc", "test_loss", "test_acc"):
        if res.get(name) is not None:
            out[name] = float(res[name])
    out["wall_s"], out["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    return out


# Methods that do not apply to a task: Forward-Forward embeds each candidate label in the input,
# which a causal language model's next-token label cannot be (a config error for the GPT).
NOT_APPLICABLE = {("gpt-bytes", "forward_forward")}


def configurations(size: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(task, method, K) of every row: BP (K = 1) then each method that applies at each K, per task."""
    return [(task, method, k) for task in size["tasks"]
            for method, k in [("bp", 1), *((m, k) for m in METHODS for k in KS)]
            if (task, method) not in NOT_APPLICABLE]


def _sweep(size: dict[str, Any], run_dir: str) -> list[dict[str, Any]]:
    jobs = []
    for task, method, k in configurations(size):
        spec = size["tasks"][task]
        for lr in spec["lrs"]:
            for seed in spec["seeds"]:
                jobs.append({"task": task, "method": method, "k": k, "lr": lr, "seed": seed, "run_dir": run_dir,
                             "overrides": run_overrides(spec, method, k, lr)})
    # Longest first (GPT, then the CNNs, K = 4 before K = 2) so the pool does not end on one long job.
    order = {t: i for i, t in enumerate(("gpt-bytes", "shapes32-cnn", "digits-cnn", "digits-mlp"))}
    jobs.sort(key=lambda j: (order.get(j["task"], 9), -j["k"]))
    runs = []
    multiprocessing.set_forkserver_preload(list(PRELOAD))
    with _one_thread_env(), ProcessPoolExecutor(max_workers=WORKERS, mp_context=multiprocessing.get_context("forkserver"),
                                                initializer=_warm_worker) as pool:
        for i, run in enumerate(pool.map(_sweep_job, jobs, chunksize=1)):
            runs.append(run)
            if (i + 1) % 50 == 0 or i + 1 == len(jobs):
                print(f"  sweep: {i + 1}/{len(jobs)} runs", file=sys.stderr, flush=True)
    return runs


def _sweep_rows(size: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for task, method, k in configurations(size):
        spec, lm = size["tasks"][task], _is_lm(task)
        mine = [r for r in runs if r["task"] == task and r["method"] == method and r["k"] == k]
        lr, by_lr = choose_lr(mine, lm)
        row: dict[str, Any] = {"part": "sweep", "task": task, "method": method, "K": k, "lr": lr}
        if lr is None:
            errors = sorted({r["error"] for r in mine if "error" in r})
            row["error"] = errors[0] if errors else "no finite validation figure"
        else:
            chosen = [r for r in mine if r["lr"] == lr]
            if not lm:
                row["val_acc"] = by_lr[lr]["val_acc"]
            row["val_loss"] = by_lr[lr]["val_loss"]
            if not lm:
                row["test_acc"], row["acc_sd"] = mean_sd([r["test_acc"] for r in chosen])
            row["test_loss"], row["loss_sd"] = mean_sd([r["test_loss"] for r in chosen])
            row["cpu_s"] = statistics.fmean(r["cpu_s"] for r in chosen)  # per run: what it costs, whatever the load
            failed = sum("error" in r for r in mine)
            if failed:
                row["failed_runs"] = failed
        row["seeds"] = list(spec["seeds"])
        row["val_by_lr"] = {str(lr_): v for lr_, v in by_lr.items()}
        row["overrides"] = run_overrides(spec, method, k, lr) if lr is not None else None
        rows.append(row)
    # Gaps against the same task's BP row.
    for task in size["tasks"]:
        bp = next(r for r in rows if r["task"] == task and r["method"] == "bp")
        for r in rows:
            if r["task"] != task or r["method"] == "bp":
                continue
            if _is_lm(task):
                if bp.get("test_loss") is not None and r.get("test_loss") is not None:
                    r["loss_x"] = r["test_loss"] / bp["test_loss"]
            elif bp.get("test_acc") is not None and r.get("test_acc") is not None:
                r["gap_pts"] = 100.0 * (bp["test_acc"] - r["test_acc"])
    return [ordered(r, _SWEEP_KEYS) for r in rows]


_SWEEP_KEYS = ("part", "task", "method", "K", "lr", "val_acc", "val_loss", "test_acc", "acc_sd", "gap_pts", "test_loss",
               "loss_sd", "loss_x", "cpu_s", "failed_runs", "error")


# ------------------------------------------------------------------------------- real pipelines


def stage_windows(records: list[dict], warmup: int, batch: int) -> dict[str, Optional[float]]:
    """A stage's samples/s over its logged windows after `warmup` steps (samples over summed window
    times), its time-weighted idle fraction and busy seconds per step, and its replayed updates."""
    w = after_warmup(records, warmup, batch)
    if not w.wall_s:
        return {"samples_s": None, "idle": None, "busy_s_step": None, "replays": None}
    return {"samples_s": w.samples / w.wall_s, "idle": w.idle_s / w.wall_s,
            "busy_s_step": (w.wall_s - w.idle_s) / (w.samples / batch), "replays": w.records[-1].get("replays")}


def _pipeline_worker(rank: int, world: int, jobs: list[dict[str, Any]], run_dir: str) -> list[dict[str, Any]]:
    """Run each job's config with `train_local` on this rank (the jobs share one process group);
    rank 0 returns, per job, the last stage's final record and every stage's window figures."""
    from dist_train.errors import UserError
    from dist_train.runtime import discover, init_distributed
    from dist_train.train.local_loop import train_local

    ctx, out = None, []
    try:
        for job in jobs:
            # The jobs share the group: a rank left waiting by a peer's failure gives up in 2 minutes.
            cfg = _config([*job["overrides"], "parallel.backend=ddp", "runtime.start_timeout_s=120",
                           "runtime.steady_timeout_s=120", f"run.dir={run_dir}", f"run.name={job['name']}"])
            if ctx is None:
                ctx = init_distributed(cfg, discover())
            t0 = time.perf_counter()
            try:
                last = train_local(cfg, ctx, ["dist-train", "bench", "local-methods", job["name"]])
            except UserError as e:  # raised alike on every rank (a config the method cannot run)
                out.append({"name": job["name"], "error": f"UserError: {e}"})
                continue
            ctx.barrier()
            stages = Path(run_dir) / job["name"] / "stages"
            per_stage = [stage_windows(read_jsonl(stages / f"stage{s}" / "metrics.jsonl"), job.get("warmup", 0),
                                       cfg.train.batch_size) for s in range(cfg.parallel.stages)]
            out.append({"name": job["name"], "wall_s": time.perf_counter() - t0, "stages": per_stage,
                        **{k: last.get(k) for k in ("loss", "val_loss", "val_acc", "step")}})
        return out
    finally:
        if ctx is not None:
            ctx.destroy()


def _on_ranks(jobs: list[dict[str, Any]], run_dir: str) -> list[dict[str, Any]]:
    from dist_train.bench._spawn import run_on_ranks

    try:
        return run_on_ranks(_pipeline_worker, nprocs=2, args=(jobs, run_dir), threads=1, preload=PRELOAD)
    except Exception as e:  # a worker died: every job of this group is reported as failed
        lines = [ln.strip() for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
        raised = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception)\b", ln)]
        msg = (raised or lines or ["worker failed"])[-1]
        return [{"name": j["name"], "error": msg[:300]} for j in jobs]


def _pipeline(size: dict[str, Any], sweep_rows: list[dict[str, Any]], runs: list[dict[str, Any]],
              run_dir: str) -> list[dict[str, Any]]:
    """Each method once on the real 2-rank pipeline, beside the reference's run of the same config."""
    p = size["pipeline"]
    task, k, seed = p["task"], p["k"], p["seed"]
    jobs, rows = [], {}
    for method in METHODS:
        row = next(r for r in sweep_rows if r["task"] == task and r["method"] == method and r["K"] == k)
        out = {"part": "pipeline", "task": task, "method": method, "K": k, "lr": row["lr"], "seed": seed}
        rows[method] = out
        if row["lr"] is None:
            out["error"] = "no lr chosen in the sweep: " + row.get("error", "")
            continue
        ref = next(r for r in runs if r["task"] == task and r["method"] == method and r["k"] == k
                   and r["lr"] == row["lr"] and r["seed"] == seed)
        out.update(ref_val_acc=ref.get("val_acc"), ref_val_loss=ref.get("val_loss"),
                   ref_train_loss=ref.get("train_loss"), overrides=[*row["overrides"], f"train.seed={seed}"])
        jobs.append({"name": f"pipe-{method}", "method": method, "overrides": out["overrides"], "warmup": 0})
    results = []
    for i in range(0, len(jobs), p["group"]):
        results.extend(_on_ranks(jobs[i:i + p["group"]], run_dir))
    for job, res in zip(jobs, results):
        out = rows[job["method"]]
        if "error" in res:
            out["error"] = res["error"]
            continue
        out.update(val_acc=res.get("val_acc"), val_loss=res.get("val_loss"), train_loss=res.get("loss"),
                   samples_s=min((s["samples_s"] for s in res["stages"] if s["samples_s"]), default=None),
                   s_run=res["wall_s"])
        if out.get("val_acc") is not None and out.get("ref_val_acc") is not None:
            out["d_val_pts"] = 100.0 * (out["val_acc"] - out["ref_val_acc"])
    keys = ("part", "task", "method", "K", "lr", "seed", "val_acc", "ref_val_acc", "d_val_pts", "val_loss",
            "ref_val_loss", "train_loss", "ref_train_loss", "samples_s", "s_run", "error")
    return [ordered(rows[m], keys) for m in METHODS]


def block_costs(overrides: list[str], repeats: int = 15) -> dict[str, Any]:
    """Forward + backward seconds of the model's embedding, each block and its head on one batch,
    one thread, median over `repeats` rounds (the modules interleaved within a round, so a change
    in machine load hits all alike); and the two stages' costs at the config's cut, counting the
    model's own head for stage 0's auxiliary head (DGL's GPT head is the same LayerNorm + Linear)."""
    import torch

    from dist_train.data import build_dataset
    from dist_train.models import build_model

    cfg = _config(overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = build_dataset(cfg.data, cfg.model.block_size)
        torch.manual_seed(0)
        model = build_model(cfg.model, data.info)
        x, _ = data.get_batch("train", torch.arange(cfg.train.batch_size))
        inputs, h = [x], x
        with torch.no_grad():
            for module in [model.embed, *model.blocks]:
                h = module(h)
                inputs.append(h)
        modules = [model.embed, *model.blocks, model.head]
        times: list[list[float]] = [[] for _ in modules]
        for _ in range(repeats):
            for i, (module, inp) in enumerate(zip(modules, inputs)):
                inp = inp if i == 0 else inp.detach().requires_grad_()
                t0 = time.perf_counter()
                module(inp).float().square().mean().backward()
                times[i].append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    med = [statistics.median(t) for t in times]
    embed, blocks, head = med[0], med[1:-1], med[-1]
    cut = cfg.parallel.cut_points[0]
    stage0, stage1 = embed + sum(blocks[:cut]) + head, sum(blocks[cut:]) + head
    return {"embed_s": embed, "blocks_s": blocks, "head_s": head, "cut": cut, "stage0_s": stage0,
            "stage1_s": stage1, "ratio": stage0 / stage1}


def _async(size: dict[str, Any], run_dir: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Synchronous vs asynchronous mode on the uneven 2-rank split, modes alternating by repeat."""
    a = size["async"]
    steps = a["warmup"] + a["measured"]
    base = [*a["overrides"], f"train.steps={steps}", f"train.log_every={a['log_every']}", "train.seed=0"]
    jobs = []
    for rep in range(a["repeats"]):
        for mode in (("sync", "async") if rep % 2 == 0 else ("async", "sync")):
            jobs.append({"name": f"async-{rep}-{mode}", "mode": mode, "repeat": rep + 1, "warmup": a["warmup"],
                         "overrides": [*base, f"local.asynchronous={'true' if mode == 'async' else 'false'}"]})
    costs = block_costs([*base, "local.asynchronous=false"])
    results = _on_ranks(jobs, run_dir)
    rows, per_mode = [], {"sync": [], "async": []}
    for job, res in zip(jobs, results):
        row: dict[str, Any] = {"part": "async", "task": "gpt-bytes", "method": "dgl", "K": 2, "mode": job["mode"],
                               "repeat": str(job["repeat"])}
        if "error" in res:
            row["error"] = res["error"]
        else:
            s0, s1 = res["stages"]
            slow = min((s0, s1), key=lambda s: s["samples_s"] or math.inf)
            row.update(samples_s=slow["samples_s"], smp_s_st0=s0["samples_s"], smp_s_st1=s1["samples_s"],
                       idle_st0=s0["idle"], idle_st1=s1["idle"], replays=s1.get("replays") or 0,
                       val_loss=res.get("val_loss"), train_loss=res.get("loss"))
            row["cost_ratio"] = costs["ratio"]  # stage 0 / stage 1, from the timed blocks
            if s0["busy_s_step"] and s1["busy_s_step"]:  # the same from the run's busy times (load-sensitive)
                row["busy_ratio"] = s0["busy_s_step"] / s1["busy_s_step"]
            per_mode[job["mode"]].append(row)
        row["overrides"] = job["overrides"]
        rows.append(ordered(row, _ASYNC_KEYS))
    summary: dict[str, Any] = {}
    for mode, mine in per_mode.items():
        med = {"part": "async", "task": "gpt-bytes", "method": "dgl", "K": 2, "mode": mode, "repeat": "median"}
        for key in ("samples_s", "smp_s_st0", "smp_s_st1", "idle_st0", "idle_st1", "cost_ratio", "busy_ratio",
                    "replays", "val_loss", "train_loss"):
            vals = [r[key] for r in mine if r.get(key) is not None]
            med[key] = statistics.median(vals) if vals else None
        rows.append(med)
        summary[mode] = med
    summary["block_costs"] = costs
    return rows, summary


_ASYNC_KEYS = ("part", "task", "method", "K", "mode", "repeat", "samples_s", "smp_s_st0", "smp_s_st1", "idle_st0",
               "idle_st1", "cost_ratio", "busy_ratio", "replays", "val_loss", "train_loss", "error")


# ------------------------------------------------------------------------------------------ run


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for method in TARGETED:
        for k in KS:
            row = next((r for r in rows if r["part"] == "sweep" and r["task"] == TARGET_TASK
                        and r["method"] == method and r["K"] == k), {})
            op, target = TARGETS[k]
            out.append(make_target(f"acc_gap_points_{method}_k{k}", row.get("gap_pts"), op, target))
    return out


def run(quick: bool) -> dict[str, Any]:
    size_name, size = pick_size(SIZES, quick)
    command, started = command_line(), utc_now()
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dist-train-bench-methods-") as run_dir:
        runs = _sweep(size, run_dir)
        seconds["sweep"] = time.perf_counter() - t
        sweep_rows = _sweep_rows(size, runs)
        t = time.perf_counter()
        pipe_rows = _pipeline(size, sweep_rows, runs, run_dir)
        seconds["pipeline"] = time.perf_counter() - t
        t = time.perf_counter()
        async_rows, async_summary = _async(size, run_dir)
        seconds["async"] = time.perf_counter() - t
    seconds["total"] = sum(seconds.values())
    rows = [*sweep_rows, *pipe_rows, *async_rows]
    setup = {"size": size_name, "workers": WORKERS, "threads_per_rank": 1, "methods": list(METHODS), "ks": list(KS),
             "common_overrides": _COMMON, "base_config": "the built-in quickstart (dist_train/configs/quickstart.yaml)",
             "tasks": size["tasks"], "pipeline": size["pipeline"], "async": size["async"],
             "target_task": TARGET_TASK, "targets": {f"k{k}": {"op": op, "target": v} for k, (op, v) in TARGETS.items()},
             "selection": "lr per (task, method, K): best mean over seeds on validation (classifiers: accuracy, "
                          "ties to lower loss; LM: loss); figures reported on the test split at that lr",
             "bp": "local_reference with parallel.stages=1 (equal step for step to dist_train.train.loop.train, "
                   "tested)",
             "async_summary": async_summary, "seconds": seconds, "sweep_runs": runs}
    return document("local-methods", command, started, setup, rows, _targets(rows))

"""`dist-train bench local-vs-bp`: the 2-stage local-learning pipeline against backprop, in one run.

One rank stands for one device: every process runs one intra-op thread, and every method is
compared at an equal number of devices (the target ratios set the 2-rank pipeline against
one-device BP by name). Fair footing: every method takes the same global batch (32) as the same
micro-batches (8 samples each, MICRO_BATCHES = 4), from the same seed, on the same batches, for the
same steps, with the same optimizer and schedule. The methods are listed in `local_vs_bp_runs`.

Throughput part (byte-level GPT, quickstart size: 4 layers, width 128, 4 heads, context 64; AdamW
lr 3e-3; synchronous local mode). Each run trains `warmup + measured` steps in fresh processes;
figures come from the steps after warm-up. The methods run in alternating order (A..H, H..A, ...),
every ratio is taken inside one repeat, and the median over repeats is reported.

  samples/s   local: the stage metrics the pipeline logs (`<run>/stages/stage<k>/metrics.jsonl`),
              samples over the summed window times of the measured windows, slower stage.
              BP loops: the same from the trainer's `metrics.jsonl`. gpipe / 1f1b: the same
              from per-step `perf_counter` stamps here, slower rank.
  peak memory per rank, the targets' figure: the peak of ALLOCATED tensor bytes while the
              method runs, over those allocated when it starts, max over ranks: what
              `torch.cuda.max_memory_allocated` counts on a GPU, read on CPU from the allocator's
              own events (`AllocatedPeak`: torch.profiler's memory events, every allocation and
              free, temporaries included). The profiler slows ops, so it runs in its own untimed
              short pass per method (the "allocated" rows). The count follows from the steps run,
              not from timing or from what malloc keeps after frees, so one pass gives it. It is
              what the method adds: weights, gradients, optimizer state, activations,
              communication buffers. (This bench runs on CPU; every figure is from the events.)
  resident set, reported beside it with no target: in every timed run, the process's peak
              resident set (VmHWM, the Linux figure behind the `ru_maxrss` that the framework logs
              as peak_mem_bytes) minus its resident set just before the method starts (the
              `mem_r0`/`mem_r1` columns and the `rss_memory_*` ratios). Every worker first builds
              the data set, trains a throw-away copy of the run's model for 2 steps at the
              method's own micro-batch (the second through activation checkpointing), so library
              code paged in on first use and the math library's per-shape GEMM buffers (MKL's
              pool) are billed to no method, runs `malloc_trim`, then resets the peak through
              /proc/self/clear_refs ("5"). The resident set also holds what glibc keeps above the
              live heap after frees, about equal on both sides of a ratio, which pulls every
              ratio towards 1; that is why it is not what the targets read. The absolute peak
              (what peak_mem_bytes shows) is in the `rss` column.
  bytes/sample over all ranks: local: the link's own `bytes_sent` counter (float32 activations
              only: every stage reads its targets from the sampler). gpipe / 1f1b: counted from
              the tensors that cross: stage 0's outputs (forward) and, of the same size, the
              gradients stage 1 sends back for its inputs, plus the 4-byte gradient-norm
              all-reduce. ddp: the gradient bucket payload seen by a comm hook (torch's own
              `allreduce_hook`) times 2(N-1)/N per rank, what a ring all-reduce sends. 1 device: 0.
  idle fraction per rank: wall time a rank waits on another. local: as the pipeline logs it
              (1 - compute time / window time). gpipe / 1f1b: time blocked in the schedule's p2p
              waits / wall time. ddp: time from the last gradient bucket's launch to the end of
              the step's last backward / wall time. 1 device: 0.
  cpu_ms      process CPU time per step (slower rank): the work a rank did, whatever other
              tenants of a shared machine took.
  live heap   a cross-check of the memory figure free of allocator retention: a separate, untimed
              short pass per method in which a dispatch mode samples glibc's live heap (mallinfo2)
              after every aten op; reported as the "heap" rows (no target).

Quality part: see `local_vs_bp_quality` (same micro-batches for BP and local).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from typing import Any, Optional

from dist_train.bench.local_vs_bp_quality import quality_rows, run_quality
from dist_train.bench.local_vs_bp_runs import (DIGITS, EXTRAS, METHOD_SPECS, METHODS, MICRO_BATCHES, PIPELINES,
                                               PRELOAD, QUICKSTART, TINY, WORLD, method_worker)
from dist_train.bench.report import command_line, document, make_target, pick_size, utc_now

ALL_METHODS = METHODS + EXTRAS  # the run order of a repeat (reversed every other repeat)

SIZES: dict[str, dict[str, Any]] = {
    "full": {"repeats": 5, "warmup": 10, "measured": 40, "log_every": 10, "heap_steps": 6, "model": QUICKSTART,
             "gpt": {"model": QUICKSTART, "steps": 300, "warmup_steps": 20, "eval_batches": 16,
                     "lrs": [1.5e-3, 3e-3, 6e-3], "seeds": [0, 1, 2]},
             "digits": {"model": DIGITS, "steps": 400, "warmup_steps": 20, "eval_batches": 11,
                        "lrs": [1e-3, 3e-3, 1e-2, 3e-2], "seeds": [0, 1, 2]}},
    "quick": {"repeats": 2, "warmup": 5, "measured": 20, "log_every": 5, "heap_steps": 6, "model": QUICKSTART,
              "gpt": {"model": QUICKSTART, "steps": 60, "warmup_steps": 10, "eval_batches": 8,
                      "lrs": [3e-3, 6e-3], "seeds": [0, 1]},
              "digits": {"model": DIGITS, "steps": 150, "warmup_steps": 10, "eval_batches": 11,
                         "lrs": [1e-3, 3e-3, 1e-2, 3e-2], "seeds": [0, 1, 2]}},
    # tests: a tiny model and a few steps; proves the benchmark runs and reports, measures nothing
    "smoke": {"repeats": 1, "warmup": 2, "measured": 2, "log_every": 2, "heap_steps": 2, "model": TINY,
              "gpt": {"model": TINY, "steps": 3, "warmup_steps": 1, "eval_batches": 1,
                      "lrs": [3e-3], "seeds": [0]},
              "digits": {"model": DIGITS, "steps": 3, "warmup_steps": 1, "eval_batches": 2,
                         "lrs": [3e-3], "seeds": [0]}},
}
# Hidden knob for the test suite: DIST_TRAIN_BENCH_SIZE=smoke overrides --quick / full.

# The targets: metric name (the JSON `metric`) -> (description, op, target). Every ratio
# is local pipeline / baseline, every baseline at micro-batches of the same size.
TARGETS = {
    "samples_s_vs_bp_1dev_accum": (
        "samples/s: local pipeline (2 ranks) / one-device BP, grad_accum 4 (median of per-repeat ratios)", ">=", 1.6),
    "samples_s_vs_best_bp_pipeline": (
        "samples/s: local pipeline / BP pipeline on the same 2 ranks, faster of GPipe and 1F1B per repeat (median)",
        ">=", 1.0),
    "bytes_vs_bp_pipeline": ("bytes sent per sample: local pipeline / BP pipeline (median)", "<=", 0.5),
    "memory_vs_bp_1dev_accum": (
        "peak allocated bytes per rank (max over ranks): local pipeline / one-device BP, grad_accum 4", "<=", 0.6),
    "memory_vs_ddp_accum": (
        "peak allocated bytes per rank: local pipeline / DDP on 2 ranks, grad_accum 2 (16 per rank in 2 x 8)",
        "<=", 0.8),
    "memory_vs_bp_checkpointed": (
        "peak allocated bytes per rank: local pipeline / one-device BP, grad_accum 4, every block checkpointed",
        "<=", 1.0),
    "gpt_val_loss_vs_bp": (
        "GPT val loss: local / BP, both grad_accum 4, each at its best lr on validation (mean over seeds)",
        "<=", 1.05),
}
# Reported beside the targets, with no target of their own.
REPORTED = {
    "samples_s_vs_ddp_accum": "samples/s: local pipeline / DDP, grad_accum 2 (median)",
    "samples_s_vs_bp_checkpointed": "samples/s: local pipeline / checkpointed one-device BP (median)",
    "memory_vs_gpipe": "peak allocated bytes per rank: local pipeline / GPipe",
    "memory_vs_1f1b": "peak allocated bytes per rank: local pipeline / 1F1B",
    "digits_val_acc_vs_bp_points": "digits val accuracy: local - BP, points, each at its best lr (mean over seeds)",
    "extra_samples_s_vs_bp_1dev_whole": "extra: samples/s, local / one-device BP on the whole batch of 32 (median)",
    "extra_memory_vs_bp_1dev_whole": "extra: peak allocated bytes, local / one-device BP on the whole batch of 32",
    "extra_samples_s_vs_ddp_whole": "extra: samples/s, local / DDP on 16 samples per rank at once (median)",
    "extra_memory_vs_ddp_whole": "extra: peak allocated bytes, local / DDP on 16 samples per rank at once",
    # The resident set beside the allocated figure of each memory target (what glibc keeps included).
    **{f"rss_{m}": f"resident set, no target: {what.split(':', 1)[1].strip()} (median of per-repeat ratios)"
       for m, (what, _, _) in TARGETS.items() if m.startswith("memory_")},
    "rss_memory_vs_best_bp_pipeline": "resident set, no target: local pipeline / the faster BP pipeline (median)",
}
# Every ratio of peak memory: metric name -> the method it divides the local pipeline's figure by.
MEMORY_RATIOS = {"memory_vs_bp_1dev_accum": "bp-1dev-accum", "memory_vs_ddp_accum": "ddp-accum",
                 "memory_vs_bp_checkpointed": "bp-ckpt", "memory_vs_gpipe": "gpipe", "memory_vs_1f1b": "1f1b",
                 "extra_memory_vs_bp_1dev_whole": "bp-1dev-whole", "extra_memory_vs_ddp_whole": "ddp-whole"}


def _median(values: list[Optional[float]]) -> Optional[float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def _measure(method: str, size: dict[str, Any], run_dir: str, name: str, probe: str = "timed") -> dict[str, Any]:
    from dist_train.bench._spawn import run_on_ranks

    warmup, measured, every = size["warmup"], size["measured"], size["log_every"]
    if probe != "timed":  # a short untimed pass: the memory peak is reached within the first steps
        warmup, measured, every = size["heap_steps"] // 2, size["heap_steps"] - size["heap_steps"] // 2, 1
    overrides = [*size["model"], f"train.steps={warmup + measured}", f"train.log_every={every}",
                 "train.eval_batches=1"]
    spec = METHOD_SPECS[method]
    ranks = run_on_ranks(method_worker, nprocs=spec.ranks, threads=1, preload=PRELOAD,
                         args=(method, overrides, warmup, run_dir, name, probe))
    main = ranks[0]
    # Throughput of a pipeline is its slower stage's; BP loops log the global rate on rank 0.
    rates = [r["samples_s"] for r in ranks if r.get("samples_s")]
    task_loss = [r["loss"] for r in ranks if r.get("loss_is_task") and r.get("loss") is not None]
    cpu = [r["cpu_s_step"] for r in ranks if r.get("cpu_s_step") is not None]
    return {
        "method": method, "ranks": len(ranks), "micro_batch": main["micro_batch"],
        "samples_s": main["samples_s"] if spec.runner == "bp" else min(rates),
        "mem_delta": [r["mem_delta"] for r in ranks], "rss_peak": [r["rss_peak"] for r in ranks],
        "bytes_per_sample": sum(r["bytes_per_sample"] for r in ranks),
        "idle": [r["idle"] for r in ranks], "cpu_s_step": max(cpu) if cpu else None,
        "loss": task_loss[0] if task_loss else None,
        "peak_reset": all(r["peak_reset"] for r in ranks), "threads": max(r["threads"] for r in ranks),
        "heap_delta": [r["heap_delta"] for r in ranks], "alloc_delta": [r["alloc_delta"] for r in ranks],
    }


def _ratios(rep: dict[str, dict]) -> dict[str, float]:
    """Local pipeline / each baseline, inside one repeat (resident set: max over ranks). The memory
    ratios here are the resident set's, under `rss_` names: the targets read `_allocated_ratios`."""
    local = rep["local"]
    pipe = max(PIPELINES, key=lambda m: rep[m]["samples_s"])  # the faster BP pipeline in this repeat

    def speed(m: str) -> float:
        return local["samples_s"] / rep[m]["samples_s"]

    def mem(m: str) -> float:
        return max(local["mem_delta"]) / max(rep[m]["mem_delta"])

    return {"samples_s_vs_bp_1dev_accum": speed("bp-1dev-accum"), "samples_s_vs_best_bp_pipeline": speed(pipe),
            "bytes_vs_bp_pipeline": local["bytes_per_sample"] / rep[pipe]["bytes_per_sample"],
            "samples_s_vs_ddp_accum": speed("ddp-accum"), "samples_s_vs_bp_checkpointed": speed("bp-ckpt"),
            "extra_samples_s_vs_bp_1dev_whole": speed("bp-1dev-whole"),
            "extra_samples_s_vs_ddp_whole": speed("ddp-whole"),
            **{f"rss_{name}": mem(m) for name, m in MEMORY_RATIOS.items()},
            "rss_memory_vs_best_bp_pipeline": mem(pipe), "faster_pipeline": pipe}


def _allocated_ratios(alloc: dict[str, dict]) -> dict[str, float]:
    """The memory ratios the targets read: the local pipeline's peak allocated bytes over each
    method's (max over ranks), from the untimed allocated pass."""
    local = max(alloc["local"]["alloc_delta"])
    return {name: local / max(alloc[m]["alloc_delta"]) for name, m in MEMORY_RATIOS.items()}


def _speed_rows(repeats: list[dict[str, dict]]) -> list[dict]:
    """One row per (repeat, method), then the medians per method.

    mb: samples in one forward (micro-batch). L_speed / L_mem / L_bytes on a method's row: the
    local pipeline's samples/s, peak resident-set increase per rank (max over ranks; the targets read
    the allocated rows instead) and bytes per sample divided by that method's, in the same repeat.
    """
    rows: list[dict[str, Any]] = []
    mib = 2.0 ** 20
    per_method: dict[str, list[dict]] = {m: [] for m in ALL_METHODS}
    for i, rep in enumerate(repeats):
        local = rep["local"]
        for m in rep["order"]:
            r = rep[m]
            idle = r["idle"] + [None] * (2 - len(r["idle"]))
            mem = r["mem_delta"] + [None] * (2 - len(r["mem_delta"]))
            row = {"part": "speed", "repeat": str(i + 1), "method": m, "mb": r["micro_batch"],
                   "samples_s": r["samples_s"], "mem_r0": mem[0] / mib, "mem_r1": None if mem[1] is None else mem[1] / mib,
                   "rss": max(r["rss_peak"]) / mib, "kib_smp": r["bytes_per_sample"] / 1024,
                   "idle_r0": idle[0], "idle_r1": idle[1],
                   "cpu_ms": None if r["cpu_s_step"] is None else r["cpu_s_step"] * 1e3,
                   "loss": r["loss"], "L_speed": local["samples_s"] / r["samples_s"],
                   "L_mem": max(local["mem_delta"]) / max(r["mem_delta"]),
                   "L_bytes": local["bytes_per_sample"] / r["bytes_per_sample"] if r["bytes_per_sample"] else None}
            rows.append(row)
            per_method[m].append(row)
    for m in ALL_METHODS:
        mine = per_method[m]
        med: dict[str, Any] = {"part": "speed", "repeat": "median", "method": m}
        for key in mine[0]:
            if key not in med:
                med[key] = _median([row[key] for row in mine])
        rows.append(med)
    return rows


def _probe_rows(part: str, runs: dict[str, dict], key: str) -> tuple[list[dict], dict[str, float]]:
    """One untimed pass's figure (`heap_delta` or `alloc_delta`): one row per method, in the mem
    columns (MiB, per rank), and the local pipeline's figure over each method's (max over ranks)."""
    mib = 2.0 ** 20
    local = max(runs["local"][key])
    rows = []
    for m in ALL_METHODS:
        d = runs[m][key] + [None] * (2 - len(runs[m][key]))
        rows.append({"part": part, "repeat": "1", "method": m, "mb": runs[m]["micro_batch"], "mem_r0": d[0] / mib,
                     "mem_r1": None if d[1] is None else d[1] / mib, "L_mem": local / max(runs[m][key])})
    ratios = {f"{part}_{m}": local / max(runs[m][key]) for m in ALL_METHODS if m != "local"}
    return rows, ratios


def run(quick: bool) -> dict[str, Any]:
    size_name, size = pick_size(SIZES, quick)
    command, started = command_line(), utc_now()
    t_start = time.perf_counter()
    repeats = []
    with tempfile.TemporaryDirectory(prefix="dist-train-bench-local-") as run_dir:
        for r in range(size["repeats"]):
            order = list(ALL_METHODS) if r % 2 == 0 else list(reversed(ALL_METHODS))
            rep: dict[str, Any] = {m: _measure(m, size, run_dir, f"speed-{r}-{m}") for m in order}
            rep["order"] = order
            repeats.append(rep)
        heap = {m: _measure(m, size, run_dir, f"heap-{m}", probe="heap") for m in ALL_METHODS}
        alloc = {m: _measure(m, size, run_dir, f"allocated-{m}", probe="allocated") for m in ALL_METHODS}
        t_speed = time.perf_counter() - t_start
        runs = run_quality(size, run_dir)
    t_total = time.perf_counter() - t_start

    speed_rows = _speed_rows(repeats)
    heap_rows, heap_ratios = _probe_rows("heap", heap, "heap_delta")
    alloc_rows, _ = _probe_rows("allocated", alloc, "alloc_delta")
    allocated = _allocated_ratios(alloc)
    q_rows, best = quality_rows(runs)
    per_repeat = [_ratios(rep) for rep in repeats]
    med = {k: _median([p[k] for p in per_repeat]) for k in per_repeat[0] if k != "faster_pipeline"}
    acc_gap = None
    if best["digits/local"]["val_acc"] is not None and best["digits/bp"]["val_acc"] is not None:
        acc_gap = 100.0 * (best["digits/local"]["val_acc"] - best["digits/bp"]["val_acc"])
    values = {**med, **allocated, "digits_val_acc_vs_bp_points": acc_gap,
              "gpt_val_loss_vs_bp": best["gpt/local"]["val_loss"] / best["gpt/bp"]["val_loss"]}
    targets = [make_target(name, values[name], op, target, description=what)
               for name, (what, op, target) in TARGETS.items()]
    reported = [{"metric": name, "value": values[name], "description": what} for name, what in REPORTED.items()]

    setup = {"size": size_name, "repeats": size["repeats"], "warmup": size["warmup"], "measured": size["measured"],
             "log_every": size["log_every"], "world_size": WORLD, "threads_per_rank": 1,
             "micro_batches": MICRO_BATCHES, "methods": list(METHODS), "extra_methods": list(EXTRAS),
             "method_overrides": {m: list(spec.overrides) for m, spec in METHOD_SPECS.items()},
             "model_overrides": size["model"], "process_group": "gloo", "local_method": "dgl (synchronous)",
             "quality": {t: {k: v for k, v in size[t].items()} for t in ("gpt", "digits")},
             "orders": [">".join(rep["order"]) for rep in repeats],
             "ratios_per_repeat": per_repeat, "ratio_medians": med, "allocated_ratios": allocated,
             "live_heap_ratios": heap_ratios,
             "quality_runs": runs, "seconds": {"throughput": t_speed, "quality": t_total - t_speed, "total": t_total},
             "peak_rss_reset": all(rep[m]["peak_reset"] for rep in repeats for m in ALL_METHODS),
             "figures": {"speed": "median over repeats of per-repeat ratios",
                         "memory": "peak allocated tensor bytes (torch.profiler memory events, untimed pass) "
                                   "over those at method start, max over ranks",
                         "rss": "VmHWM minus VmRSS at method start, max over ranks, no target",
                         "quality": "mean over seeds at each method's best lr on validation"}}
    return document("local-vs-bp", command, started, setup, [*speed_rows, *alloc_rows, *heap_rows, *q_rows], targets,
                    reported=reported)

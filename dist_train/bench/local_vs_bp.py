"""`dist-train bench local-vs-bp`: the 2-stage local-learning pipeline against backprop, in one run.

One rank stands for one device: every process runs one intra-op thread, and every method is
compared at an equal number of devices. Two parts.

Throughput (byte-level GPT, quickstart size: 4 layers, width 128, 4 heads, context 64; global batch
32; AdamW lr 3e-3; synchronous local mode), five configurations, each run in fresh processes:

  local   `dist_train.train.local_loop.train_local`, unmodified: 2 stages on 2 ranks, DGL heads,
          the batch streamed as the same M = 4 micro-batches as the BP pipelines (train.grad_accum:
          each stage accumulates, so the update is the whole batch's), targets off the wire.
  bp-1dev `dist_train.train.loop.train` with parallel.backend=none: one process, one thread.
  gpipe   a 2-stage BP pipeline on 2 ranks written here with torch.distributed.pipelining
  1f1b    (`PipelineStage` over the same `split_model` stages, `ScheduleGPipe` / `Schedule1F1B`,
          M = 4 micro-batches of the global batch 32, gradients scaled by 1/M, the global
          gradient norm all-reduced for clipping): the same update as one-device BP.
  ddp     `dist_train.train.loop.train` with parallel.backend=ddp on 2 ranks (16 samples each).

Each run trains `warmup + measured` steps; figures come from the steps after warm-up. The five
run in alternating order (A..E, E..A, ...) and every ratio is taken inside one repeat, then the
median over repeats is reported.

  samples/s   local: the stage metrics the pipeline logs (`<run>/stages/stage<k>/metrics.jsonl`),
              samples over the summed window times of the measured windows, slower stage.
              bp-1dev / ddp: the same from the trainer's `metrics.jsonl`. gpipe / 1f1b: the same
              from per-step `perf_counter` stamps here, slower rank.
  peak memory per rank: the process's peak resident set (VmHWM, the Linux figure behind the
              `ru_maxrss` that the framework logs as peak_mem_bytes) minus its resident set just
              before the method starts. Every worker first imports everything, builds the data
              set, trains a tiny throw-away model for 2 steps (so library code paged in on first
              use is not billed to any method), runs `malloc_trim`, then resets the peak through
              /proc/self/clear_refs ("5"). The delta is thus what the method adds: weights,
              gradients, optimizer state, activations, communication buffers. The absolute peak
              (what peak_mem_bytes shows) is reported beside it.
  bytes/sample over all ranks: local: the link's own `bytes_sent` counter (float32 activations
              only: local.send_targets=false, every stage reads its targets from the sampler). gpipe / 1f1b: counted from the tensors that
              cross: stage 0's outputs (forward) and, of the same size, the gradients stage 1
              sends back for its inputs, plus the 4-byte gradient-norm all-reduce. ddp: the
              gradient bucket payload seen by a comm hook (torch's own `allreduce_hook`) times
              2(N-1)/N per rank, what a ring or halving-doubling all-reduce sends. bp-1dev: 0.
  idle fraction per rank: wall time a rank is not computing its own work. local: as the
              pipeline logs it (1 - compute time / window time). gpipe / 1f1b: time blocked in
              the schedule's p2p waits / wall time. ddp: time from the last gradient bucket's
              launch to the end of backward (waiting for the all-reduces) / wall time. bp-1dev: 0.
  cpu_ms_step process CPU time per step (slower rank): the work a rank did, whatever other
              tenants of a shared machine took.
  live heap   a cross-check of the memory figure free of allocator retention: a separate, untimed
              short pass per method in which a dispatch mode samples glibc's live heap (mallinfo2)
              after every aten op; reported as the "heap" rows (not used by the targets).

Quality: final validation loss (GPT) and accuracy (digits, MLP 4 x 128) of DGL vs end-to-end BP,
each over an lr sweep and several seeds; each method's lr is chosen by its mean validation
figure. BP runs `train` (backend none); the local figures come from the sequential-stage
reference (`local_reference`: both stages in one process, one after the other), which
tests/test_local_pipeline.py proves step-for-step equal to the 2-rank pipeline (and
tests/test_bench_local.py checks this copy of it). Quality jobs run two at a time, one thread each.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional
from unittest import mock

import torch

from dist_train.bench.memory import live_heap_mode, peak_rss, reset_peak_rss
from dist_train.train.local_reference import local_reference  # noqa: F401  (also used by tests)
from dist_train.bench.report import command_line, document, make_target, pick_size, utc_now

WORLD = 2
MICRO_BATCHES = 4
METHODS = ("local", "bp-1dev", "gpipe", "1f1b", "ddp")
RANKS = {"local": 2, "bp-1dev": 1, "gpipe": 2, "1f1b": 2, "ddp": 2}

_COMMON = ["runtime.device=cpu", "runtime.threads=1", "train.eval_every=0", "checkpoint.every=0",
           "checkpoint.at_end=false", "checkpoint.resume=never", "telemetry.tensorboard=false",
           'telemetry.progress="off"', "telemetry.energy=none", "parallel.stages=1"]
QUICKSTART = ["model.name=gpt", "data.name=stdlib_bytes", "model.n_layer=4", "model.width=128", "model.n_head=4",
              "model.block_size=64", "train.batch_size=32"]
TINY = ["model.name=gpt", "data.name=stdlib_bytes", "model.n_layer=2", "model.width=32", "model.n_head=2",
        "model.block_size=16", "data.max_bytes=200000", "train.batch_size=8"]
DIGITS = ["model.name=mlp", "data.name=digits", "model.n_layer=4", "model.width=128", "train.batch_size=32",
          "data.val_fraction=0.2"]

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

TARGETS = {
    "speed_1dev": ("samples/s: local pipeline / one-device BP (median of per-repeat ratios)", ">=", 1.6),
    "speed_pipe": ("samples/s: local pipeline / BP pipeline, faster of GPipe and 1F1B (median)", ">=", 1.0),
    "bytes_pipe": ("bytes sent per sample: local pipeline / BP pipeline", "<=", 0.5),
    "mem_ddp": ("peak memory per rank (max over ranks): local pipeline / DDP (median)", "<=", 0.6),
    "mem_1dev": ("peak memory per rank: local pipeline / one-device BP (median)", "<=", 0.6),
    "acc_digits": ("digits val accuracy: local - tuned BP (points, mean over seeds)", ">=", -1.0),
    "loss_gpt": ("GPT val loss: local / tuned BP (mean over seeds)", "<=", 1.05),
}


# --------------------------------------------------------------------------------- helpers


def _config(overrides: list[str]):
    from dist_train.config import load_config

    return load_config(None, [*_COMMON, *overrides])


def _median(values: list[Optional[float]]) -> Optional[float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def _prewarm(cfg, data) -> None:
    """Page in the kernels and modules every method uses, on a tiny throw-away model."""
    from dist_train.models import build_model
    from dist_train.optim import optimizer_spec
    from dist_train.telemetry import collect_provenance

    small = cfg.model.model_copy(update={"n_layer": 1, "width": 16, "n_head": 2})
    model = build_model(small, data.info)
    opt = optimizer_spec(cfg.optim, model).build()
    x, y = data.get_batch("train", torch.arange(2))
    for _ in range(2):
        model.loss(model(x).float(), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    collect_provenance(["prewarm"], {})  # its imports are made inside every trainer's run-dir setup
    del model, opt


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _windows(records: list[dict], warmup: int, batch: int) -> dict[str, float]:
    """Samples/s over the logged windows after `warmup` (summed window times), the time-weighted
    idle fraction, and the mean training loss of the last window."""
    recs = sorted((r for r in records if "samples_per_s" in r), key=lambda r: r["step"])
    prev, wall, samples, idle, byte_marks = 0, 0.0, 0, 0.0, {}
    for r in recs:
        steps = r["step"] - prev
        byte_marks[r["step"]] = r.get("bytes_sent")
        if r["step"] > warmup:
            elapsed = steps * batch / r["samples_per_s"]
            wall += elapsed
            samples += steps * batch
            idle += r.get("idle_fraction", 0.0) * elapsed
        prev = r["step"]
    last = recs[-1]
    sent = None
    if byte_marks.get(warmup) is not None and last.get("bytes_sent") is not None:
        sent = (last["bytes_sent"] - byte_marks[warmup]) / samples
    return {"samples_s": samples / wall, "idle": idle / wall, "loss": float(last["loss"]),
            "bytes_per_sample": sent, "wall_s": wall}


class _Stamps:
    """(perf_counter, process_time) at each logged window end, keyed by step (first stamp wins)."""

    def __init__(self) -> None:
        self.at: dict[int, tuple[float, float]] = {}

    def mark(self, step: int) -> None:
        self.at.setdefault(int(step), (time.perf_counter(), time.process_time()))

    def cpu_per_step(self, warmup: int, total: int) -> Optional[float]:
        if warmup in self.at and total in self.at:
            return (self.at[total][1] - self.at[warmup][1]) / (total - warmup)
        return None


# ------------------------------------------------------------------------------- the methods


def _run_local(cfg, ctx, data, warmup: int, command: list[str]) -> dict[str, Any]:
    """The framework's pipeline, unmodified; only its data set is handed in and its log stamped."""
    from dist_train.local.layout import stage_layout
    from dist_train.telemetry import MetricsWriter
    from dist_train.train import local_loop

    stamps = _Stamps()
    original_log = MetricsWriter.log

    def log(self, step, metrics):
        stamps.mark(step)
        return original_log(self, step, metrics)

    with mock.patch.object(local_loop, "build_dataset", lambda *_: data), \
            mock.patch.object(MetricsWriter, "log", log):
        local_loop.train_local(cfg, ctx, command)
    layout = stage_layout(ctx.rank, ctx.world_size, cfg.parallel.stages)
    recs = _records(Path(cfg.run.dir) / cfg.run.name / "stages" / f"stage{layout.stage}" / "metrics.jsonl")
    out = _windows(recs, warmup, cfg.train.batch_size)
    out["bytes_per_sample"] = out["bytes_per_sample"] or 0.0
    out["cpu_s_step"] = stamps.cpu_per_step(warmup, cfg.train.steps)
    out["loss_is_task"] = layout.last
    return out


class _DDPProbe:
    """Comm-hook instrumentation of DDP: bucket bytes per step and the wait at the end of backward."""

    def __init__(self) -> None:
        self.launch = 0.0
        self.bucket_bytes = 0
        self.bw_end: list[float] = []
        self.idle: list[float] = []
        self.payload: list[int] = []

    def hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        buf = bucket.buffer()
        self.bucket_bytes += buf.numel() * buf.element_size()
        self.launch = time.perf_counter()
        return default_hooks.allreduce_hook(state, bucket)

    def backward_done(self) -> None:
        t = time.perf_counter()
        self.bw_end.append(t)
        self.idle.append(max(0.0, t - self.launch) if self.bucket_bytes else 0.0)
        self.payload.append(self.bucket_bytes)
        self.bucket_bytes = 0


def _run_bp(cfg, ctx, data, warmup: int, command: list[str]) -> dict[str, Any]:
    """The framework's end-to-end loop (backend none or ddp), unmodified but for instrumentation."""
    from dist_train.parallel.ddp import DDPBackend
    from dist_train.train import loop

    stamps = _Stamps()
    probe = _DDPProbe()
    original_window = loop._window_metrics
    original_setup, original_backward = DDPBackend.setup, DDPBackend.backward

    def window_metrics(cfg_, ctx_, energy, done, *args, **kwargs):
        stamps.mark(done)
        return original_window(cfg_, ctx_, energy, done, *args, **kwargs)

    def setup(self, model, make_optimizer):
        original_setup(self, model, make_optimizer)
        self.model.register_comm_hook(None, probe.hook)

    def backward(self, loss, is_last):
        original_backward(self, loss, is_last)
        probe.backward_done()

    with mock.patch.object(loop, "build_dataset", lambda *_: data), \
            mock.patch.object(loop, "_window_metrics", window_metrics), \
            mock.patch.object(DDPBackend, "setup", setup), mock.patch.object(DDPBackend, "backward", backward):
        loop.train(cfg, ctx, command)
    total = cfg.train.steps
    out: dict[str, Any] = {"cpu_s_step": stamps.cpu_per_step(warmup, total), "loss_is_task": True,
                           "idle": 0.0, "bytes_per_sample": 0.0}
    if ctx.is_main:
        out.update(_windows(_records(Path(cfg.run.dir) / cfg.run.name / "metrics.jsonl"), warmup,
                            cfg.train.batch_size))
        out["idle"], out["bytes_per_sample"] = 0.0, 0.0
    if cfg.parallel.backend == "ddp" and len(probe.bw_end) == total:
        span = probe.bw_end[total - 1] - probe.bw_end[warmup - 1]
        out["idle"] = sum(probe.idle[warmup:total]) / span
        payload = sum(probe.payload[warmup:total]) / (total - warmup)
        per_rank = 2 * (ctx.world_size - 1) / ctx.world_size * payload
        out["bytes_per_sample"] = per_rank / cfg.train.batch_size  # this rank's share; summed later
        out["payload_bytes_step"] = payload
    return out


def _run_pipe(cfg, ctx, data, warmup: int, schedule_name: str) -> dict[str, Any]:
    """Backprop through a 2-stage torch.distributed.pipelining pipeline (GPipe or 1F1B)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    from torch.distributed.pipelining import schedules as pp_schedules

    from dist_train.local.split import split_model
    from dist_train.models import build_model
    from dist_train.models.loss import cross_entropy
    from dist_train.optim import lr_at, optimizer_spec

    rank, world = ctx.rank, ctx.world_size
    t, batch = cfg.train, cfg.train.batch_size
    torch.manual_seed(t.seed)  # the same initial weights as every other method
    model = build_model(cfg.model, data.info)
    module = split_model(model, world, cfg.parallel.cut_points)[rank]
    del model  # this rank keeps its own stage only
    crossing = [0]  # bytes this rank sends per step through the pipeline

    if rank < world - 1:  # forward: this stage's output goes to the next rank
        module.register_forward_hook(lambda m, i, o: crossing.__setitem__(0, crossing[0] + o.numel() * o.element_size()))
    if rank > 0:  # backward: the gradient of this stage's input (same size) goes back
        module.register_forward_pre_hook(lambda m, i: crossing.__setitem__(
            0, crossing[0] + sum(a.numel() * a.element_size() for a in i if torch.is_tensor(a))))

    stage = PipelineStage(module, rank, world, ctx.device)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule_name]
    schedule = cls(stage, n_microbatches=MICRO_BATCHES, loss_fn=cross_entropy, scale_grads=True)
    optimizer = optimizer_spec(cfg.optim, module).build()
    params = [p for p in module.parameters()]
    sampler = data.sampler("train", t.seed, batch)

    waited = [0.0]
    original_wait = pp_schedules._wait_batch_p2p

    def timed_wait(work):
        t0 = time.perf_counter()
        original_wait(work)
        waited[0] += time.perf_counter() - t0

    stamps: list[tuple[float, float]] = []
    waits: list[float] = []
    sent: list[int] = []
    losses: list[float] = []
    ctx.barrier()
    with mock.patch.object(pp_schedules, "_wait_batch_p2p", timed_wait):
        for step in range(t.steps):
            stamps.append((time.perf_counter(), time.process_time()))
            waited[0], crossing[0] = 0.0, 0
            lr = lr_at(step, cfg.optim, t.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = data.get_batch("train", sampler.next_indices(0, 1))  # the whole global batch
            if rank == 0:
                schedule.step(x)
            else:
                mb_losses: list = []
                schedule.step(target=y, losses=mb_losses)
                losses.append(float(torch.stack([l.detach() for l in mb_losses]).mean()))
            # BP clips the global gradient norm: sum the stages' squared norms (one float).
            grads = [p.grad for p in params if p.grad is not None]
            sq = torch.stack([g.detach().pow(2).sum() for g in grads]).sum().reshape(1)
            dist.all_reduce(sq)
            crossing[0] += 2 * (world - 1) // world * sq.numel() * sq.element_size()
            if t.grad_clip > 0:
                coef = torch.clamp(t.grad_clip / (sq.sqrt() + 1e-6), max=1.0).reshape(())
                torch._foreach_mul_(grads, coef)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            waits.append(waited[0])
            sent.append(crossing[0])
        stamps.append((time.perf_counter(), time.process_time()))
    measured = t.steps - warmup
    wall = stamps[t.steps][0] - stamps[warmup][0]
    out = {"samples_s": measured * batch / wall, "wall_s": wall, "idle": sum(waits[warmup:]) / wall,
           "bytes_per_sample": sum(sent[warmup:]) / (measured * batch),
           "cpu_s_step": (stamps[t.steps][1] - stamps[warmup][1]) / measured,
           "loss": statistics.fmean(losses[-cfg.train.log_every:]) if losses else None,
           "loss_is_task": rank == world - 1}
    return out


def _method_worker(rank: int, world: int, method: str, overrides: list[str], warmup: int,
                   run_dir: str, run_name: str, live_heap: bool = False) -> list[dict[str, Any]]:
    """One run of one method on this rank; returns every rank's measurements (on rank 0)."""
    import torch.distributed as dist
    import torch.distributed.pipelining  # noqa: F401  (imported by every worker, outside the measure)
    from torch.nn.parallel import DistributedDataParallel  # noqa: F401

    from dist_train.data import build_dataset
    from dist_train.runtime import discover, init_distributed
    from dist_train.train import local_loop, loop  # noqa: F401

    extra = {"local": ["parallel.backend=ddp", "parallel.stages=2", "local.method=dgl", "local.send_targets=false",
                       f"train.grad_accum={MICRO_BATCHES}"],
             "bp-1dev": ["parallel.backend=none"], "ddp": ["parallel.backend=ddp"],
             "gpipe": ["parallel.backend=ddp"], "1f1b": ["parallel.backend=ddp"]}[method]
    cfg = _config([*overrides, *extra, f"run.dir={run_dir}", f"run.name={run_name}"])
    ctx = init_distributed(cfg, discover())
    command = ["dist-train", "bench", "local-vs-bp", method]
    try:
        data = build_dataset(cfg.data, cfg.model.block_size)
        _prewarm(cfg, data)
        ctx.barrier()
        rss0, reset_ok = reset_peak_rss()
        mode = live_heap_mode() if live_heap else contextlib.nullcontext()
        with mode:
            if method == "local":
                out = _run_local(cfg, ctx, data, warmup, command)
            elif method in ("bp-1dev", "ddp"):
                out = _run_bp(cfg, ctx, data, warmup, command)
            else:
                out = _run_pipe(cfg, ctx, data, warmup, method)
        peak = peak_rss()
        out.update(rank=rank, mem_delta=peak - rss0, rss_peak=peak, rss_before=rss0, peak_reset=reset_ok,
                   threads=torch.get_num_threads(),
                   heap_delta=(mode.peak - mode.base) if live_heap else None)
        if ctx.distributed:
            gathered: list = [None] * ctx.world_size
            dist.all_gather_object(gathered, out)
            return gathered
        return [out]
    finally:
        ctx.destroy()


def _measure(method: str, size: dict[str, Any], run_dir: str, name: str, live_heap: bool = False) -> dict[str, Any]:
    from dist_train.bench._spawn import run_on_ranks

    warmup, measured, every = size["warmup"], size["measured"], size["log_every"]
    if live_heap:  # a short untimed pass: the live-heap peak is reached within the first steps
        warmup, measured, every = size["heap_steps"] // 2, size["heap_steps"] - size["heap_steps"] // 2, 1
    overrides = [*size["model"], f"train.steps={warmup + measured}", f"train.log_every={every}",
                 "train.eval_batches=1"]
    ranks = run_on_ranks(_method_worker, nprocs=RANKS[method],
                         args=(method, overrides, warmup, run_dir, name, live_heap), threads=1)
    main = ranks[0]
    # Throughput of a pipeline is its slower stage's; BP loops log the global rate on rank 0.
    rates = [r["samples_s"] for r in ranks if r.get("samples_s")]
    task_loss = [r["loss"] for r in ranks if r.get("loss_is_task") and r.get("loss") is not None]
    cpu = [r["cpu_s_step"] for r in ranks if r.get("cpu_s_step") is not None]
    return {
        "method": method, "ranks": len(ranks),
        "samples_s": min(rates) if method in ("local", "gpipe", "1f1b") else main["samples_s"],
        "mem_delta": [r["mem_delta"] for r in ranks], "rss_peak": [r["rss_peak"] for r in ranks],
        "bytes_per_sample": sum(r["bytes_per_sample"] for r in ranks),
        "idle": [r["idle"] for r in ranks], "cpu_s_step": max(cpu) if cpu else None,
        "loss": task_loss[0] if task_loss else None,
        "peak_reset": all(r["peak_reset"] for r in ranks), "threads": max(r["threads"] for r in ranks),
        "heap_delta": [r["heap_delta"] for r in ranks],
    }


# ------------------------------------------------------------------------------------ quality


def pipeline_stage_losses(rank: int, world: int, overrides: list[str], run_dir: str) -> list[list[float]]:
    """Per-stage, per-step losses of the real 2-rank pipeline (train_local, log_every=1): what
    `local_reference` must reproduce. For tests; run it with `run_on_ranks`."""
    from dist_train.runtime import discover, init_distributed
    from dist_train.train.local_loop import train_local

    cfg = _config([*overrides, "parallel.backend=ddp", "train.log_every=1", f"run.dir={run_dir}", "run.name=pipe"])
    ctx = init_distributed(cfg, discover())
    try:
        train_local(cfg, ctx, ["test"])
        ctx.barrier()
        stages = Path(run_dir) / "pipe" / "stages"
        return [[r["loss"] for r in _records(stages / f"stage{k}" / "metrics.jsonl")]
                for k in range(cfg.parallel.stages)]
    finally:
        ctx.destroy()


def _quality_job(job: dict[str, Any]) -> dict[str, Any]:
    """One training run for the quality table (runs in a pool worker with one thread)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    overrides = [*job["model"], f"train.steps={job['steps']}", f"optim.warmup_steps={job['warmup_steps']}",
                 f"train.eval_batches={job['eval_batches']}", f"optim.lr={job['lr']}", f"train.seed={job['seed']}",
                 f"train.log_every={min(10, job['steps'])}", f"run.dir={job['run_dir']}",
                 f"run.name={job['task']}-{job['method']}-{job['lr']}-{job['seed']}"]
    if job["method"] == "local":
        cfg = _config([*overrides, "parallel.backend=none", "parallel.stages=2", "local.method=dgl"])
        res = local_reference(cfg)
        tail = res["losses"][-1][-min(10, job["steps"]):]  # the last stage's task loss, last window
        metrics = {"val_loss": res["val_loss"], "val_acc": res.get("val_acc"), "train_loss": statistics.fmean(tail)}
    else:
        from dist_train.runtime import discover, init_distributed
        from dist_train.train.loop import train

        cfg = _config([*overrides, "parallel.backend=none"])
        ctx = init_distributed(cfg, discover({}))
        last = train(cfg, ctx, ["dist-train", "bench", "local-vs-bp", "quality"])
        metrics = {"val_loss": last["val_loss"], "val_acc": last.get("val_acc"), "train_loss": last["loss"]}
    return {**{k: job[k] for k in ("task", "method", "lr", "seed")}, **metrics,
            "wall_s": time.perf_counter() - t0}


@contextlib.contextmanager
def _one_thread_env():
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _quality(size: dict[str, Any], run_dir: str) -> list[dict[str, Any]]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for task in ("gpt", "digits"):  # the long GPT jobs first; BP and local alternate
        spec = size[task]
        for seed in spec["seeds"]:
            for lr in spec["lrs"]:
                for method in ("bp", "local"):
                    jobs.append({**{k: spec[k] for k in ("model", "steps", "warmup_steps", "eval_batches")},
                                 "task": task, "method": method, "lr": lr, "seed": seed, "run_dir": run_dir})
    with _one_thread_env(), ProcessPoolExecutor(max_workers=WORLD,
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_quality_job, jobs))


def _quality_rows(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict]]:
    """Mean and sd over seeds per (task, method, lr); each method's best lr on validation."""
    rows, best = [], {}
    for task in ("gpt", "digits"):
        for method in ("bp", "local"):
            cells = []
            for lr in sorted({r["lr"] for r in runs if r["task"] == task and r["method"] == method}):
                mine = [r for r in runs if r["task"] == task and r["method"] == method and r["lr"] == lr]
                loss = [r["val_loss"] for r in mine]
                acc = [r["val_acc"] for r in mine if r["val_acc"] is not None]
                cells.append({"part": task, "repeat": f"{len(mine)} seeds", "method": method,
                              "loss": statistics.fmean(r["train_loss"] for r in mine), "lr": lr,
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


# ------------------------------------------------------------------------------------- run


def _speed_rows(repeats: list[dict[str, dict]]) -> tuple[list[dict], dict[str, list]]:
    """One row per (repeat, method), then the medians per method.

    L_speed / L_mem / L_bytes on a method's row: the local pipeline's samples/s, peak memory per
    rank (max over ranks) and bytes per sample divided by that method's, in the same repeat.
    """
    rows: list[dict[str, Any]] = []
    ratios: dict[str, list] = {k: [] for k in ("speed_1dev", "speed_pipe", "speed_ddp", "bytes_pipe", "mem_ddp",
                                               "mem_1dev", "mem_pipe")}
    mib = 2.0 ** 20
    per_method: dict[str, list[dict]] = {m: [] for m in METHODS}
    for i, rep in enumerate(repeats):
        local = rep["local"]
        local_mem = max(local["mem_delta"])
        for m in rep["order"]:
            r = rep[m]
            idle = r["idle"] + [None] * (2 - len(r["idle"]))
            mem = r["mem_delta"] + [None] * (2 - len(r["mem_delta"]))
            row = {"part": "speed", "repeat": str(i + 1), "method": m, "samples_s": r["samples_s"],
                   "mem_r0": mem[0] / mib, "mem_r1": None if mem[1] is None else mem[1] / mib,
                   "rss": max(r["rss_peak"]) / mib, "kib_smp": r["bytes_per_sample"] / 1024,
                   "idle_r0": idle[0], "idle_r1": idle[1],
                   "cpu_ms": None if r["cpu_s_step"] is None else r["cpu_s_step"] * 1e3,
                   "loss": r["loss"], "L_speed": local["samples_s"] / r["samples_s"],
                   "L_mem": local_mem / max(r["mem_delta"]),
                   "L_bytes": local["bytes_per_sample"] / r["bytes_per_sample"] if r["bytes_per_sample"] else None}
            rows.append(row)
            per_method[m].append(row)
        pipe = max(("gpipe", "1f1b"), key=lambda m: rep[m]["samples_s"])
        ratio = {"speed_1dev": local["samples_s"] / rep["bp-1dev"]["samples_s"],
                 "speed_pipe": local["samples_s"] / rep[pipe]["samples_s"],
                 "speed_ddp": local["samples_s"] / rep["ddp"]["samples_s"],
                 "bytes_pipe": local["bytes_per_sample"] / rep[pipe]["bytes_per_sample"],
                 "mem_ddp": local_mem / max(rep["ddp"]["mem_delta"]),
                 "mem_1dev": local_mem / max(rep["bp-1dev"]["mem_delta"]),
                 "mem_pipe": local_mem / max(rep[pipe]["mem_delta"])}
        for k, v in ratio.items():
            ratios[k].append(v)
    for m in METHODS:
        mine = per_method[m]
        med = {"part": "speed", "repeat": "median", "method": m}
        for key in mine[0]:
            if key not in med:
                med[key] = _median([row[key] for row in mine])
        rows.append(med)
    return rows, ratios


def _heap_rows(heap: dict[str, dict]) -> tuple[list[dict], dict[str, float]]:
    """The live-heap cross-check: one row per method, in the mem columns (MiB, per rank)."""
    mib = 2.0 ** 20
    local = max(heap["local"]["heap_delta"])
    rows = []
    for m in METHODS:
        d = heap[m]["heap_delta"] + [None] * (2 - len(heap[m]["heap_delta"]))
        rows.append({"part": "heap", "repeat": "1", "method": m, "mem_r0": d[0] / mib,
                     "mem_r1": None if d[1] is None else d[1] / mib, "L_mem": local / max(heap[m]["heap_delta"])})
    ratios = {f"heap_{m}": local / max(heap[m]["heap_delta"]) for m in METHODS if m != "local"}
    return rows, ratios


def run(quick: bool) -> dict[str, Any]:
    size_name, size = pick_size(SIZES, quick)
    command, started = command_line(), utc_now()
    t_start = time.perf_counter()
    repeats = []
    with tempfile.TemporaryDirectory(prefix="dist-train-bench-local-") as run_dir:
        for r in range(size["repeats"]):
            order = list(METHODS) if r % 2 == 0 else list(reversed(METHODS))
            rep: dict[str, Any] = {m: _measure(m, size, run_dir, f"speed-{r}-{m}") for m in order}
            rep["order"] = order
            repeats.append(rep)
        heap = {m: _measure(m, size, run_dir, f"heap-{m}", live_heap=True) for m in METHODS}
        t_speed = time.perf_counter() - t_start
        runs = _quality(size, run_dir)
    t_total = time.perf_counter() - t_start

    speed_rows, ratios = _speed_rows(repeats)
    heap_rows, heap_ratios = _heap_rows(heap)
    quality_rows, best = _quality_rows(runs)
    med = {k: _median(v) for k, v in ratios.items()}
    acc_gap = None
    if best["digits/local"]["val_acc"] is not None and best["digits/bp"]["val_acc"] is not None:
        acc_gap = 100.0 * (best["digits/local"]["val_acc"] - best["digits/bp"]["val_acc"])
    values = {**med, "acc_digits": acc_gap,
              "loss_gpt": best["gpt/local"]["val_loss"] / best["gpt/bp"]["val_loss"]}
    targets = [make_target(metric, values[key], op, target) for key, (metric, op, target) in TARGETS.items()]

    setup = {"size": size_name, "repeats": size["repeats"], "warmup": size["warmup"], "measured": size["measured"],
             "log_every": size["log_every"], "world_size": WORLD, "threads_per_rank": 1,
             "micro_batches": MICRO_BATCHES, "methods": list(METHODS), "model_overrides": size["model"],
             "process_group": "gloo", "local_method": "dgl (synchronous)",
             "quality": {t: {k: v for k, v in size[t].items()} for t in ("gpt", "digits")},
             "orders": [">".join(rep["order"]) for rep in repeats],
             "ratios_per_repeat": ratios, "ratio_medians": med, "live_heap_ratios": heap_ratios,
             "quality_runs": runs, "seconds": {"throughput": t_speed, "quality": t_total - t_speed, "total": t_total},
             "peak_rss_reset": all(rep[m]["peak_reset"] for rep in repeats for m in METHODS),
             "figures": {"speed": "median over repeats of per-repeat ratios",
                         "memory": "VmHWM minus VmRSS at method start, max over ranks",
                         "quality": "mean over seeds at each method's best lr on validation"}}
    return document("local-vs-bp", command, started, setup, [*speed_rows, *heap_rows, *quality_rows],
                    targets)

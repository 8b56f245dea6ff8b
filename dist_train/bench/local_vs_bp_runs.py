"""The methods `dist-train bench local-vs-bp` compares, and how one run of each is measured.

Each run happens in fresh worker processes (one per rank, one thread each, forked from a server
that imported torch once: see `_spawn.run_on_ranks`); `method_worker` is what every rank runs.
Every method trains the same model from the same seed on the same batches, and every headline
method computes each forward on micro-batches of the same size (global batch / MICRO_BATCHES):

  local          `train_local` as is: 2 stages on 2 ranks, DGL heads, the batch streamed as M
                 micro-batches (train.grad_accum=M), targets off the wire.
  bp-1dev-accum  `loop.train`, backend none, train.grad_accum=M: one device, M micro-batches.
  ddp-accum      `loop.train`, backend ddp on 2 ranks, train.grad_accum=M/2: each rank's half of
                 the batch in micro-batches of the same size, gradients all-reduced once a step.
  bp-ckpt        bp-1dev-accum plus parallel.activation_checkpointing (every block recomputed in
                 backward): the comparator InfoPro measured its memory against.
  gpipe, 1f1b    `torch.distributed.pipelining` over the same 2-stage cut, M micro-batches.
  bp-1dev-whole, ddp-whole   extras, not in any target: the whole batch (32, or 16 per DDP rank)
                 in one forward, as the superseded runs compared.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from unittest import mock

import torch

from dist_train.bench.memory import AllocatedPeak, live_heap_mode, peak_rss, reset_peak_rss
from dist_train.bench.windows import after_warmup, read_jsonl

WORLD = 2
MICRO_BATCHES = 4  # M: micro-batches per global batch, for every method (32 / 4 = 8 samples each)
# Imported once in the fork server the workers start from (all a method's imports, outside its measure).
PRELOAD = ("torch", "torch.distributed.pipelining", "torch.nn.parallel",
           "torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "dist_train.bench.local_vs_bp_runs",
           "dist_train.train.loop", "dist_train.train.local_loop")

_COMMON = ["runtime.device=cpu", "runtime.threads=1", "train.eval_every=0", "checkpoint.every=0",
           "checkpoint.at_end=false", "checkpoint.resume=never", "telemetry.tensorboard=false",
           'telemetry.progress="off"', "telemetry.energy=none", "parallel.stages=1",
           "train.sample_tokens=0"]  # the quickstart generates 200 tokens after training: not what is compared
QUICKSTART = ["model.name=gpt", "data.name=stdlib_bytes", "model.n_layer=4", "model.width=128", "model.n_head=4",
              "model.block_size=64", "train.batch_size=32"]
TINY = ["model.name=gpt", "data.name=stdlib_bytes", "model.n_layer=2", "model.width=32", "model.n_head=2",
        "model.block_size=16", "data.max_bytes=200000", "train.batch_size=8"]
DIGITS = ["model.name=mlp", "data.name=digits", "model.n_layer=4", "model.width=128", "train.batch_size=32",
          "data.val_fraction=0.2"]


@dataclass(frozen=True)
class Method:
    name: str
    ranks: int
    runner: str  # "local" (train_local), "bp" (loop.train) or "pipe" (torch.distributed.pipelining)
    overrides: tuple[str, ...]
    headline: bool = True  # False: an extra row, used by no target


_M = MICRO_BATCHES
METHOD_SPECS = {m.name: m for m in (
    Method("local", WORLD, "local", ("parallel.backend=ddp", "parallel.stages=2", "local.method=dgl",
                                     "local.send_targets=false", f"train.grad_accum={_M}")),
    Method("bp-1dev-accum", 1, "bp", ("parallel.backend=none", f"train.grad_accum={_M}")),
    # loop.train splits each rank's share (batch / world) into grad_accum micro-batches.
    Method("ddp-accum", WORLD, "bp", ("parallel.backend=ddp", f"train.grad_accum={_M // WORLD}")),
    Method("bp-ckpt", 1, "bp", ("parallel.backend=none", f"train.grad_accum={_M}",
                                "parallel.activation_checkpointing=true")),
    Method("gpipe", WORLD, "pipe", ("parallel.backend=ddp", f"train.grad_accum={_M}")),
    Method("1f1b", WORLD, "pipe", ("parallel.backend=ddp", f"train.grad_accum={_M}")),
    Method("bp-1dev-whole", 1, "bp", ("parallel.backend=none", "train.grad_accum=1"), headline=False),
    Method("ddp-whole", WORLD, "bp", ("parallel.backend=ddp", "train.grad_accum=1"), headline=False),
)}
METHODS = tuple(m for m, spec in METHOD_SPECS.items() if spec.headline)
EXTRAS = tuple(m for m, spec in METHOD_SPECS.items() if not spec.headline)
PIPELINES = ("gpipe", "1f1b")


def config(overrides: list[str]):
    from dist_train.config import load_config

    return load_config(None, [*_COMMON, *overrides])


def _prewarm(cfg, data, micro_batch: int) -> None:
    """Page in the kernels and modules every method uses, and fill the math library's caches, on a
    throw-away copy of the run's own model at the method's own forward size.

    Why the real shapes: MKL keeps the packing buffers of every GEMM shape it has run in its own
    pool ("fast memory management"), live heap that is never returned. A tiny prewarm model
    (width 16, as until 2026-12-06) filled that pool only for its own shapes, so the pool for the
    real ones (8.9 MiB for the quickstart GPT at 8 samples per forward on an Intel Xeon; the AMD EPYC
    of the earlier runs was not probed) was billed to the method: about the same constant on both
    sides of every ratio, which moves each ratio towards 1. Each method now has the pool filled for
    its own shapes (`tests/test_bench_local.py` checks that a step after the prewarm retains nothing)."""
    from dist_train.models import build_model
    from dist_train.optim import optimizer_spec
    from dist_train.telemetry import collect_provenance
    from dist_train.parallel.activation_checkpointing import apply_activation_checkpointing

    model = build_model(cfg.model, data.info)
    opt = optimizer_spec(cfg.optim, model).build()
    x, y = data.get_batch("train", torch.arange(micro_batch))
    for i in range(2):
        if i == 1:  # the second step through the recomputation path that bp-ckpt uses
            apply_activation_checkpointing(model)
        model.loss(model(x).float(), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    collect_provenance(["prewarm"], {})  # its imports are made inside every trainer's run-dir setup
    del model, opt


def _windows(records: list[dict], warmup: int, batch: int) -> dict[str, float]:
    """Samples/s over the logged windows after `warmup` (summed window times), the time-weighted
    idle fraction, the mean training loss of the last window, and the bytes sent per sample after
    the warm-up."""
    w = after_warmup(records, warmup, batch)
    sent_at = {r["step"]: r.get("bytes_sent") for r in w.records}
    last = w.records[-1]
    sent = None
    if sent_at.get(warmup) is not None and last.get("bytes_sent") is not None:
        sent = (last["bytes_sent"] - sent_at[warmup]) / w.samples
    return {"samples_s": w.samples / w.wall_s, "idle": w.idle_s / w.wall_s, "loss": float(last["loss"]),
            "bytes_per_sample": sent, "wall_s": w.wall_s}


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


# ------------------------------------------------------------------------------- the runners


def _run_local(cfg, ctx, data, warmup: int, command: list[str]) -> dict[str, Any]:
    """The framework's pipeline, unmodified; only its data set is handed in and its log stamped."""
    from dist_train.local.layout import stage_layout
    from dist_train.train.hooks import Hooks
    from dist_train.train.local_loop import train_local

    stamps = _Stamps()
    train_local(cfg, ctx, command, data=data, hooks=Hooks(on_step=stamps.mark))
    layout = stage_layout(ctx.rank, ctx.world_size, cfg.parallel.stages)
    recs = read_jsonl(Path(cfg.run.dir) / cfg.run.name / "stages" / f"stage{layout.stage}" / "metrics.jsonl")
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
    from dist_train.train.hooks import Hooks
    from dist_train.train.loop import train

    stamps = _Stamps()
    probe = _DDPProbe()
    original_backward = DDPBackend.backward

    def setup(backend) -> None:
        if isinstance(backend, DDPBackend):
            backend.model.register_comm_hook(None, probe.hook)

    def backward(self, loss, is_last):
        original_backward(self, loss, is_last)
        if is_last:  # with grad_accum, only the last micro-batch's backward reduces
            probe.backward_done()

    # The end of DDP's backward (its last bucket reduced) is the backend's, not the loop's: timed there.
    with mock.patch.object(DDPBackend, "backward", backward):
        train(cfg, ctx, command, data=data, hooks=Hooks(on_setup=setup, on_step=stamps.mark))
    total = cfg.train.steps
    out: dict[str, Any] = {"cpu_s_step": stamps.cpu_per_step(warmup, total), "loss_is_task": True,
                           "idle": 0.0, "bytes_per_sample": 0.0}
    if ctx.is_main:
        out.update(_windows(read_jsonl(Path(cfg.run.dir) / cfg.run.name / "metrics.jsonl"), warmup,
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
    from dist_train.optim import lr_at, optimizer_spec, set_lr

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
    schedule = cls(stage, n_microbatches=t.grad_accum, loss_fn=cross_entropy, scale_grads=True)
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
            set_lr(optimizer, lr)
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


PROBES = ("timed", "heap", "allocated")  # what a run measures beside its own figures; see method_worker


def _probe(kind: str):
    """The memory probe a run is wrapped in. "timed": none (the timed runs; their memory figure is the
    resident set). "heap": glibc's live heap after every aten op. "allocated": the peak of tensor
    bytes from torch's CPU allocator events (what the memory targets read). The two probes slow ops,
    so they run in their own untimed passes, and never together: the profiler's own mallocs would
    show in the live heap."""
    if kind == "heap":
        return live_heap_mode()
    if kind == "allocated":
        return AllocatedPeak()
    if kind == "timed":
        return contextlib.nullcontext()
    raise ValueError(f"probe must be one of {PROBES}, got {kind!r}")


def method_worker(rank: int, world: int, method: str, overrides: list[str], warmup: int,
                  run_dir: str, run_name: str, probe: str = "timed") -> list[dict[str, Any]]:
    """One run of one method on this rank; returns every rank's measurements (on rank 0).

    `probe` (one of PROBES) adds `heap_delta` or `alloc_delta` (bytes, over what was live when the
    method started). The allocator's events are those of this rank's main thread, where every method
    here allocates its tensors (other threads only wait on the link or on gloo)."""
    import importlib

    import torch.distributed as dist

    from dist_train.data import build_dataset

    for module in PRELOAD:  # every method's imports, before any measure (no-ops in a preloaded worker)
        importlib.import_module(module)
    from dist_train.runtime import discover, init_distributed

    spec = METHOD_SPECS[method]
    cfg = config([*overrides, *spec.overrides, f"run.dir={run_dir}", f"run.name={run_name}"])
    ctx = init_distributed(cfg, discover())
    command = ["dist-train", "bench", "local-vs-bp", method]
    try:
        data = build_dataset(cfg.data, cfg.model.block_size)
        # Samples in one forward: the data-parallel ranks (DDP only) split the batch, then grad_accum.
        dp = ctx.world_size if spec.runner == "bp" else 1
        micro_batch = cfg.train.batch_size // (dp * cfg.train.grad_accum)
        _prewarm(cfg, data, micro_batch)
        ctx.barrier()
        rss0, reset_ok = reset_peak_rss()
        mode = _probe(probe)
        with mode:
            if spec.runner == "local":
                out = _run_local(cfg, ctx, data, warmup, command)
            elif spec.runner == "bp":
                out = _run_bp(cfg, ctx, data, warmup, command)
            else:
                out = _run_pipe(cfg, ctx, data, warmup, method)
        peak = peak_rss()
        out.update(rank=rank, mem_delta=peak - rss0, rss_peak=peak, rss_before=rss0, peak_reset=reset_ok,
                   threads=torch.get_num_threads(), micro_batch=micro_batch,
                   heap_delta=(mode.peak - mode.base) if probe == "heap" else None,
                   alloc_delta=mode.peak if probe == "allocated" else None)
        if ctx.distributed:
            gathered: list = [None] * ctx.world_size
            dist.all_gather_object(gathered, out)
            return gathered
        return [out]
    finally:
        ctx.destroy()


def pipeline_stage_losses(rank: int, world: int, overrides: list[str], run_dir: str) -> list[list[float]]:
    """Per-stage, per-step losses of the real 2-rank pipeline (train_local, log_every=1): what
    `local_reference` must reproduce. For tests; run it with `run_on_ranks`."""
    from dist_train.runtime import discover, init_distributed
    from dist_train.train.local_loop import train_local

    cfg = config([*overrides, "parallel.backend=ddp", "train.log_every=1", f"run.dir={run_dir}", "run.name=pipe"])
    ctx = init_distributed(cfg, discover())
    try:
        train_local(cfg, ctx, ["test"])
        ctx.barrier()
        stages = Path(run_dir) / "pipe" / "stages"
        return [[r["loss"] for r in read_jsonl(stages / f"stage{k}" / "metrics.jsonl")]
                for k in range(cfg.parallel.stages)]
    finally:
        ctx.destroy()



def reference_stage_losses(rank: int, world: int, overrides: list[str]) -> list[list[float]]:
    """`local_reference`'s per-stage losses for the same overrides: what `pipeline_stage_losses`
    must match. For tests; run it with `run_on_ranks(nprocs=1, preload=PRELOAD)`, so that it starts
    from the fork server with torch already imported."""
    from dist_train.train.local_reference import local_reference

    return local_reference(config([*overrides, "parallel.backend=none"]))["losses"]

"""`dist-train bench overhead`: the framework's DDP step vs a hand-written torch DDP loop.

Acceptance: on the quickstart model, the framework's steady-state step time is within 5% of the
loop a user would write with torch alone — same model, data, optimizer and world — measured side
by side in one run (target: median ratio <= 1.05).

A = `dist_train.train.loop.train`, unmodified, on the quickstart config with parallel.backend=ddp
    and everything that is not the training step switched off or made rare: no checkpoints, no
    TensorBoard, progress bar or energy meter, metrics logged every 10 steps (the quickstart's
    log_every), evaluation only after the last step.
B = `_handwritten` below: DDP(model), cross-entropy, backward, clip_grad_norm_, AdamW.step,
    zero_grad(set_to_none=True), the lr set per step; nothing else.

Both run in the same 2 worker processes (gloo, 1 intra-op thread each, one process group made by
the framework's `init_distributed`), build a fresh model per run from the same seed, and read the
same batches: one dataset object, one StepSampler per run. That sampler is the clock: each time a
step asks for its batch, it stamps `perf_counter()` (and the process CPU time). A step is the time
from one such request to the next, so it includes everything the loop does between steps (the
framework's periodic logging too). After `warmup` steps, `measured` steps are timed; a run's step
time is the mean over them on the slower rank. Both loops end on the same loss (`loss_abs_diff`),
which shows they did the same work.

Two ways to pair A with B, both in every run of the benchmark:

lockstep   (the figure) A and B train at the same time in two threads of each worker that hand a
           baton back and forth at every step boundary: A step 0, B step 0, A step 1, ... Only the
           baton holder runs, so neither sees the other's work, and each pair of steps is measured
           within a few hundred milliseconds of each other: load from other tenants of a shared
           machine hits both sides alike. Every collective either side makes happens while it holds
           the baton, in the same order on every rank.
sequential (the cross-check) whole runs one after the other, order alternating AB, BA, ... as a
           user would run them; here the framework's own logged `step_time_s` for the same steps
           can be compared with the sampler clock (in lockstep it also counts B's turns).

The reported ratio is the median over repeats of the per-repeat ratio A/B (lockstep rows).
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dist_train.bench.report import command_line, document, make_target, pick_size, utc_now
from dist_train.data.base import Dataset
from dist_train.data.sampler import StepSampler

TARGET_RATIO = 1.05
METRIC = "framework_step_time / handwritten_step_time (median)"
WORLD = 2
# What the fork server the ranks are forked from imports once (torch's import, seconds on a loaded
# machine, is then paid once rather than by each rank).
PRELOAD = ("torch", "torch.distributed", "dist_train.train.loop", "dist_train.bench.overhead")
LOG_EVERY = 10  # the quickstart's own logging frequency

# lockstep / sequential: number of A/B pairs in each mode; warmup: untimed steps per run;
# measured: timed steps per run.
SIZES = {
    "full": {"lockstep": 8, "sequential": 4, "warmup": 10, "measured": 60},
    "quick": {"lockstep": 3, "sequential": 2, "warmup": 10, "measured": 20},
    "smoke": {"lockstep": 1, "sequential": 1, "warmup": 2, "measured": 4},  # tests: runs, measures nothing
}
# Hidden knob for the test suite: DIST_TRAIN_BENCH_SIZE=smoke overrides --quick / full.


# ---------------------------------------------------------------------------- baton and clock


class _Baton:
    """Lets one of two threads ("A", "B") run at a time; they swap at step boundaries."""

    def __init__(self, first: str):
        self._cond = threading.Condition()
        self._turn = first
        self._done: set[str] = set()

    @staticmethod
    def _other(me: str) -> str:
        return "B" if me == "A" else "A"

    def wait_turn(self, me: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._turn == me)

    def hand_over(self, me: str) -> None:
        """Let the other thread run one step (unless it has finished); return when it is our turn."""
        with self._cond:
            if self._other(me) in self._done:
                return
            self._turn = self._other(me)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._turn == me)

    def finish(self, me: str) -> None:
        with self._cond:
            self._done.add(me)
            self._turn = self._other(me)
            self._cond.notify_all()


class _TimedSampler(StepSampler):
    """StepSampler that stamps the clocks when a step asks for its batch (and, in lockstep, lets
    the other loop run its step in between: the hand-over is outside both steps)."""

    def __init__(self, *args: Any, baton: Optional[_Baton] = None, me: str = "", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.baton, self.me = baton, me
        # ends[k]: previous step ended (call k entered); starts[k]: step k began (turn acquired).
        self.ends: list[tuple[float, float]] = []
        self.starts: list[tuple[float, float]] = []

    def next_indices(self, rank: int = 0, world: int = 1) -> torch.Tensor:
        self.ends.append((time.perf_counter(), time.process_time()))
        if self.baton is not None:
            self.baton.hand_over(self.me)
        self.starts.append((time.perf_counter(), time.process_time()))
        return super().next_indices(rank, world)


class SharedData(Dataset):
    """A view of one shared dataset whose train sampler is the clock."""

    def __init__(self, inner: Dataset, baton: Optional[_Baton] = None, me: str = ""):
        self.inner, self.baton, self.me = inner, baton, me
        self.info = inner.info
        self.sampling = inner.sampling
        self.train_sampler: Optional[_TimedSampler] = None

    def num_samples(self, split):
        return self.inner.num_samples(split)

    def get_batch(self, split, indices):
        return self.inner.get_batch(split, indices)

    def sampler(self, split, seed, global_batch):
        if split != "train":
            return self.inner.sampler(split, seed, global_batch)
        self.train_sampler = _TimedSampler(self.num_samples("train"), global_batch, seed, self.sampling,
                                           baton=self.baton, me=self.me)
        return self.train_sampler


def step_timing(sampler: _TimedSampler, warmup: int, measured: int) -> dict[str, float]:
    """Seconds per step over steps [warmup, warmup + measured), on the slower rank.

    step_s, the wall-clock mean, is the figure (it is what throughput is). Beside it: p50_s, the
    median single step, which shrugs off steps another tenant preempted, and cpu_s, the process
    CPU time per step (work this process did, whoever else ran). Collective: each rank calls it
    once per run.
    """
    import torch.distributed as dist

    steps = range(warmup, warmup + measured)
    wall = [sampler.ends[k + 1][0] - sampler.starts[k][0] for k in steps]
    cpu = [sampler.ends[k + 1][1] - sampler.starts[k][1] for k in steps]
    t = torch.tensor([sum(wall) / measured, statistics.median(wall), sum(cpu) / measured], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {"step_s": float(t[0]), "p50_s": float(t[1]), "cpu_s": float(t[2])}


# ------------------------------------------------------------------------------------ loops


def bench_config(run_dir: str, name: str, warmup: int, measured: int, extra: tuple[str, ...] = ()):
    """The quickstart model trained end to end with DDP (the quickstart itself is a local pipeline),
    everything that is not the training step switched off or made rare (`extra` overrides last)."""
    from dist_train.config import load_config

    # +1 step: step warmup+measured-1 ends when step warmup+measured asks for its batch; that last
    # step (with the final log and evaluation after it) is outside the window.
    return load_config(None, [
        "parallel.backend=ddp", "parallel.stages=1", "runtime.device=cpu", "runtime.threads=1",
        f"train.steps={warmup + measured + 1}", f"train.log_every={min(LOG_EVERY, warmup)}",
        "train.eval_every=0", "train.eval_batches=1",
        "checkpoint.every=0", "checkpoint.at_end=false", "checkpoint.resume=never",
        # "off" quoted: bare off is YAML 1.1 for false, which the progress field rejects.
        "telemetry.tensorboard=false", 'telemetry.progress="off"', "telemetry.energy=none",
        # The sampler is the clock (and the lock-step baton): its draw must happen when a step starts,
        # on the loop's thread, not one step ahead on the prefetch thread; the hand-written loop
        # does not prefetch either.
        "data.prefetch=false",
        f"run.dir={run_dir}", f"run.name={name}", *extra,
    ])


def run_framework(cfg, ctx, data: SharedData, warmup: int, measured: int) -> dict[str, float]:
    """A: the framework's own training loop, unmodified; only its dataset is handed in."""
    from dist_train.train import loop

    last = loop.train(cfg, ctx, ["dist-train", "bench", "overhead"], data=data)
    out = {**step_timing(data.train_sampler, warmup, measured), "loss": float(last["loss"]),
           "logged_step_s": float("nan")}
    if ctx.is_main:
        # The logged windows ending at steps warmup+log_every .. warmup+measured are the timed steps.
        every = cfg.train.log_every
        recs = [json.loads(line) for line in (Path(cfg.run.dir) / cfg.run.name / "metrics.jsonl").open()]
        logged = [r["step_time_s"] * every for r in recs if warmup + every <= r["step"] <= warmup + measured]
        if len(logged) * every == measured:
            out["logged_step_s"] = sum(logged) / measured
    return out


def _lr(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine down to min_ratio * peak: the schedule as a user writes it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = peak * min_ratio
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def _handwritten(cfg, data: SharedData, warmup: int, measured: int) -> dict[str, float]:
    """B: the minimal torch DDP loop a user would write for the same model, data and optimizer."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dist_train.models import GPT

    rank, world = dist.get_rank(), dist.get_world_size()
    m, o, t = cfg.model, cfg.optim, cfg.train
    torch.manual_seed(t.seed)
    model = GPT(data.info.vocab_size, m.n_layer, m.width, m.n_head, m.block_size, m.dropout)
    ddp = DDP(model)
    # Weight decay is 0 in the quickstart, so one parameter group is the same update as the
    # framework's decay / no-decay split.
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay)
    sampler = data.sampler("train", t.seed, t.batch_size)
    dist.barrier()
    for step in range(t.steps):
        lr = _lr(step, o.lr, o.warmup_steps, t.steps, o.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = data.get_batch("train", sampler.next_indices(rank, world))
        logits = ddp(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    timing = step_timing(sampler, warmup, measured)
    final = loss.detach().double().reshape(1)
    dist.all_reduce(final)
    return {**timing, "loss": float(final) / world}


def lockstep(arms: dict[str, Callable[[SharedData], dict]], inner: Dataset, first: str) -> dict[str, dict]:
    """Run both arms in two threads that alternate step by step, `first` starting."""
    baton = _Baton(first)
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def body(me: str) -> None:
        baton.wait_turn(me)
        try:
            results[me] = arms[me](SharedData(inner, baton, me))
        except BaseException as e:  # re-raised in the caller after both threads stop
            errors.append(e)
        finally:
            baton.finish(me)

    threads = [threading.Thread(target=body, args=(me,), name=f"bench-{me}") for me in "AB"]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return results


def _worker(rank: int, world: int, size: dict[str, int], run_dir: str) -> dict[str, Any]:
    from dist_train.data import build_dataset
    from dist_train.runtime import discover, init_distributed

    warmup, measured = size["warmup"], size["measured"]
    cfg0 = bench_config(run_dir, "setup", warmup, measured)
    # The hand-written loop takes one optimizer step per batch with AdamW and no weight decay.
    assert cfg0.train.grad_accum == 1 and cfg0.optim.weight_decay == 0 and cfg0.optim.name == "adamw"
    ctx = init_distributed(cfg0, discover())  # one process group, reused by every run below
    inner = build_dataset(cfg0.data, cfg0.model.block_size)
    runs: list[dict[str, Any]] = []
    try:
        for mode in ("lockstep", "sequential"):
            for r in range(size[mode]):
                order = "AB" if r % 2 == 0 else "BA"
                cfg = bench_config(run_dir, f"{mode}-{r}", warmup, measured)  # fresh name: never resumes
                arms = {"A": lambda data: run_framework(cfg, ctx, data, warmup, measured),
                        "B": lambda data: _handwritten(cfg, data, warmup, measured)}
                gc.collect()
                ctx.barrier()
                if mode == "lockstep":
                    res = lockstep(arms, inner, first=order[0])
                else:
                    res = {}
                    for arm in order:
                        gc.collect()
                        ctx.barrier()
                        res[arm] = arms[arm](SharedData(inner))
                runs.append({"mode": mode, "order": order, "A": res["A"], "B": res["B"]})
    finally:
        ctx.destroy()
    return {"runs": runs, "batch_size": cfg0.train.batch_size, "log_every": cfg0.train.log_every,
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------- run


def _median(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def _rows(runs: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for mode in ("lockstep", "sequential"):
        mine = [r for r in runs if r["mode"] == mode]
        block = []
        for i, r in enumerate(mine):
            a, b = r["A"], r["B"]
            block.append({
                "mode": mode, "repeat": str(i + 1), "order": r["order"],
                "fw_step_ms": a["step_s"] * 1e3, "hw_step_ms": b["step_s"] * 1e3,
                "ratio": a["step_s"] / b["step_s"],
                "fw_samples_s": batch / a["step_s"], "hw_samples_s": batch / b["step_s"],
                "ratio_p50": a["p50_s"] / b["p50_s"], "ratio_cpu": a["cpu_s"] / b["cpu_s"],
                "fw_logged_step_ms": a["logged_step_s"] * 1e3 if mode == "sequential" else None,
                "loss_abs_diff": abs(a["loss"] - b["loss"]),
            })
        if block:
            median = {"mode": mode, "repeat": "median", "order": ""}
            for key in block[0]:
                if key not in median:
                    values = [row[key] for row in block]
                    median[key] = None if all(v is None for v in values) else _median(values)
            rows.extend([*block, median])
    return rows


def run(quick: bool) -> dict[str, Any]:
    from dist_train.bench._spawn import run_on_ranks

    size_name, size = pick_size(SIZES, quick)
    command, started = command_line(), utc_now()
    with tempfile.TemporaryDirectory(prefix="dist-train-bench-overhead-") as run_dir:
        out = run_on_ranks(_worker, nprocs=WORLD, args=(size, run_dir), threads=1,
                           preload=PRELOAD, env=dict(os.environ))

    rows = _rows(out["runs"], out["batch_size"])
    lockstep_median = next(r for r in rows if r["mode"] == "lockstep" and r["repeat"] == "median")
    setup = {"size": size_name, **size, "world_size": WORLD, "threads_per_rank": out["threads"],
             "process_group": "gloo", "global_batch": out["batch_size"], "log_every": out["log_every"],
             "model": "quickstart GPT (4 layers, width 128, 4 heads, block 64, vocab 256)",
             "clock": "StepSampler stamps per step, slower rank, mean over the measured steps",
             "figure": "median over lockstep repeats of framework/handwritten step time"}
    return document("overhead", command, started, setup, rows,
                    [make_target(METRIC, lockstep_median["ratio"], "<=", TARGET_RATIO)])

"""`dist-train bench scale`: what the scaling features cost and give, each side against its baseline
in one run: `parallel.compile` against eager, and selective activation checkpointing against none
and full; and the training time a checkpoint save costs, written in the background (`checkpoint.async`)
against in place (`stall_section`, `bench/checkpoint_stall.py`, with its own size and runs).

Every side runs `dist_train.train.loop.train` unmodified on the same 2 gloo ranks (one thread each)
with FSDP2 per block, the same `llama`, byte corpus, global batch, seed, optimizer and steps: only
`parallel.compile` and `parallel.activation_checkpointing` differ. Sides:

  eager       no compile, no checkpointing (the baseline of both comparisons);
  compile     `parallel.compile=true` (each block compiled; its compile time is excluded from the
              tokens/s, which start after the warm-up steps, and reported on its own as compile_s:
              dynamo's own counters, the first repeat's, when the process compiles from cold);
  full        every block recomputed;
  selective   `mode: selective` with its default kind, `every_n: 2` (torchtitan's default: every
              second block recomputed whole): the side the targets read, chosen before the first
              full-size run because it is the default a user gets;
  op          `selective op` (every matmul and attention output kept, the rest recomputed), and
  op_half     `selective op` with `save_matmuls: every_second` (torchtitan's per-op variant),
              both reported beside it.

Measured per repeat, sides alternating in order (forward, then reversed, ...):
- tokens/s: global tokens per step over the mean wall time of the measured steps, on the slower
  rank (the overhead benchmark's per-step clock);
- peak allocated tensor bytes per rank during the training steps (the allocator's own events,
  `AllocatedPeak`; on a GPU `torch.cuda.max_memory_allocated`), in an untimed pass (the profiler
  slows ops); not for the compile side, whose activations are eager's.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from typing import Any

import torch

from dist_train.bench.llama_runs import SIZES as LLAMA_SIZES, llama_model, run_overrides
from dist_train.bench.overhead import SharedData, step_timing
from dist_train.bench.report import command_line, document, make_target, pick_size, utc_now

WORLD = 2
# What the fork server the ranks are forked from imports once (torch's import, seconds on a loaded
# machine, is then paid once rather than by each rank).
PRELOAD = ("torch", "torch.distributed", "dist_train.train.loop", "dist_train.bench.scale")
# side -> its overrides over the common ones
SIDES = {
    "eager": (),
    "compile": ("parallel.compile=true",),
    "full": ("parallel.activation_checkpointing.mode=full",),
    "selective": ("parallel.activation_checkpointing.mode=selective",),  # the default kind: every_n 2
    "op": ("parallel.activation_checkpointing.mode=selective", "parallel.activation_checkpointing.selective=op"),
    "op_half": ("parallel.activation_checkpointing.mode=selective", "parallel.activation_checkpointing.selective=op",
                "parallel.activation_checkpointing.save_matmuls=every_second"),
}
MEMORY_SIDES = ("eager", "full", "selective", "op", "op_half")
OTHER_SELECTIVE = {"op": "selective op (all matmuls kept)", "op_half": "selective op (every second matmul kept)"}
# full and quick: the llama benchmarks' shared sizes (bench/llama_runs.py), whose at
# least 2 warm-up steps this bench needs: the compile side compiles at the first step (until 2026-12-07 a compiled
# llama block also compiled again at its second call, when it cached its rotary tables on itself).
SIZES = {
    **LLAMA_SIZES,
    "smoke": {"n_layer": 2, "width": 32, "n_head": 2, "n_kv_heads": 1, "block": 16, "batch": 4,
              "warmup": 2, "measured": 2, "memory_steps": 1, "repeats": 1},
}


def _overrides(size: dict, run_dir: str, name: str, steps: int, side: str) -> list[str]:
    return run_overrides(size, run_dir, name, steps, llama_model(size), *SIDES[side])


def _memory_pass(cfg, ctx, inner) -> dict[str, int]:
    """Peak allocated bytes per rank of the training steps (after the backend wrapped the model)."""
    from dist_train.bench.memory import AllocatedPeak
    from dist_train.train import loop
    from dist_train.train.hooks import Hooks

    probe = AllocatedPeak()
    loop.train(cfg, ctx, ["dist-train", "bench", "scale"], data=SharedData(inner),
               hooks=Hooks(on_setup=lambda _backend: probe.__enter__()))
    probe.__exit__(None, None, None)
    peak = torch.tensor([probe.peak], dtype=torch.float64)
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return {"step_bytes": int(peak[0])}


def _timed_pass(cfg, ctx, inner, size: dict) -> dict[str, float]:
    from dist_train.parallel.compile import compile_seconds
    from dist_train.train import loop

    data = SharedData(inner)
    before = compile_seconds()
    last = loop.train(cfg, ctx, ["dist-train", "bench", "scale"], data=data)
    timing = step_timing(data.train_sampler, size["warmup"], size["measured"])
    compiled = torch.tensor([compile_seconds() - before], dtype=torch.float64)
    torch.distributed.all_reduce(compiled, op=torch.distributed.ReduceOp.MAX)
    return {"tokens_s": size["batch"] * size["block"] / timing["step_s"], "step_s": timing["step_s"],
            "compile_s": float(compiled[0]), "loss": float(last["loss"])}


def _worker(rank: int, world: int, size: dict, run_dir: str, sides: tuple[str, ...]) -> dict[str, Any]:
    from dist_train.config import load_config
    from dist_train.data import build_dataset
    from dist_train.runtime import discover, init_distributed

    def cfg(side: str, name: str, steps: int):
        return load_config(None, _overrides(size, run_dir, name, steps, side))

    ctx = init_distributed(cfg("eager", "setup", 1), discover())
    inner = build_dataset(cfg("eager", "setup", 1).data, size["block"])
    rows = []
    try:
        for r in range(size["repeats"]):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                row = {"side": side, "repeat": r + 1}
                # +1 step: the last measured step ends when the next one asks for its batch
                row |= _timed_pass(cfg(side, f"{side}-t{r}", size["warmup"] + size["measured"] + 1), ctx, inner, size)
                if side in MEMORY_SIDES:
                    row |= _memory_pass(cfg(side, f"{side}-m{r}", size["memory_steps"]), ctx, inner)
                rows.append(row)
    finally:
        ctx.destroy()
    return {"rows": rows, "threads": torch.get_num_threads()}


def _median(rows: list[dict], side: str, key: str) -> float:
    return statistics.median(r[key] for r in rows if r["side"] == side)


def compile_and_checkpointing_section(size: dict, tmp: str) -> dict[str, Any]:
    """The rows, targets and reported figures of the compile and activation-checkpointing sides."""
    from dist_train.bench._spawn import run_on_ranks

    out = run_on_ranks(_worker, nprocs=WORLD, args=(size, tmp, tuple(SIDES)), threads=1,
                       preload=PRELOAD, env=dict(os.environ))
    rows = out["rows"]
    compiled = [r["compile_s"] for r in rows if r["side"] == "compile"]  # none when SIDES leaves it out
    tokens = {s: _median(rows, s, "tokens_s") for s in SIDES if s != "compile" or compiled}
    memory = {s: _median(rows, s, "step_bytes") for s in MEMORY_SIDES}
    targets = [
        make_target("tokens_s_compile_vs_eager", tokens["compile"] / tokens["eager"] if compiled else None, ">=", 0.97,
                    "median tokens/s after warm-up (compile time excluded), parallel.compile over eager (FSDP2, 2 ranks, CPU)"),
        make_target("memory_selective_vs_none", memory["selective"] / memory["eager"], "<=", 0.7,
                    "median peak allocated bytes per rank in the training steps, selective (every_n 2) over none"),
        make_target("tokens_s_selective_vs_full", tokens["selective"] / tokens["full"], ">=", 1.05,
                    "median tokens/s, selective (every_n 2) over full"),
    ]
    reported = [
        {"metric": "compile_s", "value": max(compiled) if compiled else None,
         "description": "seconds compiling (dynamo's counters, slower rank), the first compiled run's"},
        {"metric": "memory_full_vs_none", "value": memory["full"] / memory["eager"],
         "description": "peak allocated bytes, full over none"},
        *({"metric": f"memory_{side}_vs_none", "value": memory[side] / memory["eager"],
           "description": f"peak allocated bytes, {what} over none"} for side, what in OTHER_SELECTIVE.items()),
        *({"metric": f"tokens_s_{side}_vs_full", "value": tokens[side] / tokens["full"],
           "description": f"tokens/s, {what} over full"} for side, what in OTHER_SELECTIVE.items()),
        {"metric": "tokens_s_selective_vs_none", "value": tokens["selective"] / tokens["eager"],
         "description": "tokens/s, selective (every_n 2) over none (the recomputation's cost)"},
    ]
    return {"rows": rows, "targets": targets, "reported": reported, "threads": out["threads"]}


def stall_section(quick: bool) -> dict[str, Any]:
    """The checkpoint-stall section (`stall_async_vs_sync`): its own runs at its own size (a model
    whose checkpoint is large enough for the write to matter), rows tagged with their section."""
    from dist_train.bench.checkpoint_stall import measure_stall

    out = measure_stall(quick=quick)
    return {"rows": [{"section": "checkpoint_stall", **r} for r in out["rows"]], "targets": out["targets"],
            "reported": out["reported"], "setup": out["setup"]}


# the section functions `run` calls in turn (a test may leave one out)
SECTIONS = ("compile_and_checkpointing", "stall")


def run(quick: bool) -> dict[str, Any]:
    size_name, size = pick_size(SIZES, quick)
    command, started = command_line(), utc_now()
    with tempfile.TemporaryDirectory(prefix="dist-train-bench-scale-") as tmp:
        parts = {"compile_and_checkpointing": lambda: compile_and_checkpointing_section(size, tmp),
                 "stall": lambda: stall_section(quick)}
        sections = [parts[name]() for name in SECTIONS]
    setup_doc = {"size": size_name, **size, "world_size": WORLD, "threads_per_rank": sections[0].get("threads"),
                 "backend": "fsdp (FSDP2, per block)", "model": "llama", "data": "stdlib_bytes (vocab 256)",
                 "optimizer": "adamw", "sides": {s: list(o) for s, o in SIDES.items()},
                 "figure": "medians over repeats; sides alternate in order, then reversed",
                 **{"checkpoint_stall": s["setup"] for s in sections if "setup" in s}}
    return document("scale", command, started, setup_doc, [r for s in sections for r in s["rows"]],
                    [t for s in sections for t in s["targets"]], [x for s in sections for x in s["reported"]])

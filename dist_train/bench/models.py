"""`dist-train bench models`: dist-train's `llama` against Hugging Face's `LlamaForCausalLM` of the
same configuration, trained by the same loop.

Both sides run `dist_train.train.loop.train` unmodified on the same 2 gloo ranks (one thread each),
with FSDP2 per block, the same byte corpus, global batch, micro-batches, seed, optimizer and steps:
only `model.name` differs. The HF side is `model.name: hf` over a `config.json` written from the
llama's own export mapping (`LlamaForCausalLM`'s config for exactly that shape), so the two models
have the same parameters, the same FLOPs and the same initial-weight distribution, and the
comparison is of the model implementations (attention, RoPE, MLP, norms) and their set-up.

Measured per repeat, sides alternating in order (AB, BA, ...):
- tokens/s: global tokens per step over the mean wall time of the measured steps, on the slower
  rank (the overhead benchmark's per-step clock: the train sampler stamps each step);
- peak allocated tensor bytes per rank (the allocator's own events, `AllocatedPeak`; on a GPU
  `torch.cuda.max_memory_allocated`), during the training steps and, separately, during set-up
  (build, shard, initialise), in an untimed pass of a few steps (the profiler slows ops).
Set-up memory of the `llama` is also measured on 1 rank: sharded initialisation makes the
2-rank figure about half of it (`setup_memory_2_vs_1`).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from dist_train.bench.llama_runs import SIZES as LLAMA_SIZES, llama_model, run_overrides
from dist_train.bench.overhead import SharedData, step_timing
from dist_train.bench.report import command_line, document, make_target, pick_size, utc_now

WORLD = 2
# What the fork server the ranks are forked from imports once (torch's import, seconds on a loaded
# machine, is then paid once rather than by each rank).
PRELOAD = ("torch", "torch.distributed", "dist_train.train.loop", "transformers.models.llama.modeling_llama",
           "dist_train.bench.models")
SIDES = ("llama", "hf")
# full and quick: the llama benchmarks' shared sizes (bench/llama_runs.py)
SIZES = {
    **LLAMA_SIZES,
    "smoke": {"n_layer": 2, "width": 64, "n_head": 4, "n_kv_heads": 2, "block": 32, "batch": 4,
              "warmup": 1, "measured": 2, "memory_steps": 1, "repeats": 1},
}


def _overrides(size: dict, run_dir: str, name: str, steps: int, hf_folder: str, side: str) -> list[str]:
    model = llama_model(size) if side == "llama" else ["model.name=hf", f"model.hf_config={hf_folder}"]
    return run_overrides(size, run_dir, name, steps, model)


def write_hf_config(size: dict, folder: Path) -> Path:
    """`config.json` of the `LlamaForCausalLM` with the llama side's exact shape (its export mapping)."""
    from dist_train.config import load_config
    from dist_train.data.base import DataInfo
    from dist_train.export_hf import hf_exporter
    from dist_train.models import build_model

    cfg = load_config(None, _overrides(size, str(folder), "shape", 1, "", "llama"))
    info = DataInfo(task="lm", vocab_size=256, input_shape=None, num_classes=None, train_size=0, val_size=0)
    with torch.device("meta"):
        model = build_model(cfg.model, info)
    config, _ = hf_exporter(model, "model.name llama")(model)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def _memory_pass(cfg, ctx, inner) -> dict[str, int]:
    """Peak allocated bytes of set-up (until the backend has wrapped the model) and of the steps."""
    from dist_train.bench.memory import AllocatedPeak
    from dist_train.train import loop
    from dist_train.train.hooks import Hooks

    setup, steps = AllocatedPeak(), AllocatedPeak()

    def switch(_backend) -> None:
        setup.__exit__(None, None, None)
        steps.__enter__()

    setup.__enter__()
    loop.train(cfg, ctx, ["dist-train", "bench", "models"], data=SharedData(inner), hooks=Hooks(on_setup=switch))
    steps.__exit__(None, None, None)
    peaks = torch.tensor([setup.peak, steps.peak], dtype=torch.float64)
    torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    return {"setup_bytes": int(peaks[0]), "step_bytes": int(peaks[1])}


def _timed_pass(cfg, ctx, inner, size: dict) -> dict[str, float]:
    from dist_train.train import loop

    data = SharedData(inner)
    last = loop.train(cfg, ctx, ["dist-train", "bench", "models"], data=data)
    timing = step_timing(data.train_sampler, size["warmup"], size["measured"])
    return {"tokens_s": size["batch"] * size["block"] / timing["step_s"], "step_s": timing["step_s"],
            "loss": float(last["loss"])}


def _worker(rank: int, world: int, size: dict, run_dir: str, hf_folder: str, timed: bool) -> dict[str, Any]:
    from dist_train.config import load_config
    from dist_train.data import build_dataset
    from dist_train.runtime import discover, init_distributed

    def cfg(side: str, name: str, steps: int):
        return load_config(None, _overrides(size, run_dir, name, steps, hf_folder, side))

    ctx = init_distributed(cfg("llama", "setup", 1), discover())
    inner = build_dataset(cfg("llama", "setup", 1).data, size["block"])
    rows = []
    try:
        for r in range(size["repeats"] if timed else 1):
            for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                row = {"side": side, "repeat": r + 1, "ranks": world}
                if timed:  # +1 step: the last measured step ends when the next one asks for its batch
                    row |= _timed_pass(cfg(side, f"{side}-t{r}", size["warmup"] + size["measured"] + 1), ctx,
                                       inner, size)
                row |= _memory_pass(cfg(side, f"{side}-m{r}", size["memory_steps"]), ctx, inner)
                rows.append(row)
    finally:
        ctx.destroy()
    return {"rows": rows, "threads": torch.get_num_threads()}


def _median(rows: list[dict], side: str, key: str, ranks: int = WORLD) -> float:
    return statistics.median(r[key] for r in rows if r["side"] == side and r["ranks"] == ranks)


def run(quick: bool) -> dict[str, Any]:
    from dist_train.bench._spawn import run_on_ranks

    size_name, size = pick_size(SIZES, quick)
    command, started = command_line(), utc_now()
    with tempfile.TemporaryDirectory(prefix="dist-train-bench-models-") as tmp:
        hf_folder = str(write_hf_config(size, Path(tmp) / "hf"))
        two = run_on_ranks(_worker, nprocs=WORLD, args=(size, tmp, hf_folder, True), threads=1,
                           preload=PRELOAD, env=dict(os.environ))
        one = run_on_ranks(_worker, nprocs=1, args=(size, tmp, hf_folder, False), threads=1,
                           preload=PRELOAD, env=dict(os.environ))
    rows = two["rows"] + one["rows"]
    tokens = {s: _median(rows, s, "tokens_s") for s in SIDES}
    step_mem = {s: _median(rows, s, "step_bytes") for s in SIDES}
    setup = {(s, n): _median(rows, s, "setup_bytes", n) for s in SIDES for n in (1, WORLD)}
    targets = [
        make_target("tokens_s_vs_hf", tokens["llama"] / tokens["hf"], ">=", 1.0,
                    "median tokens/s of dist-train's llama over HF LlamaForCausalLM's (FSDP2, 2 ranks)"),
        make_target("memory_vs_hf", step_mem["llama"] / step_mem["hf"], "<=", 1.0,
                    "median peak allocated bytes per rank in the training steps, llama over HF"),
        make_target("setup_memory_2_vs_1", setup[("llama", WORLD)] / setup[("llama", 1)], "<=", 0.6,
                    "llama's peak allocated bytes per rank during set-up (build, shard, initialise): 2 ranks over 1"),
    ]
    reported = [{"metric": "hf_setup_memory_2_vs_1", "value": setup[("hf", WORLD)] / setup[("hf", 1)],
                 "description": "the same for the HF model (built in full on every rank, then sharded)"},
                {"metric": "setup_memory_vs_hf", "value": setup[("llama", WORLD)] / setup[("hf", WORLD)],
                 "description": "set-up peak per rank at 2 ranks, llama over HF"}]
    setup_doc = {"size": size_name, **size, "world_size": WORLD, "threads_per_rank": two["threads"],
                 "backend": "fsdp (FSDP2, per block)", "data": "stdlib_bytes (vocab 256)", "optimizer": "adamw",
                 "figure": "medians over repeats; sides alternate AB / BA"}
    return document("models", command, started, setup_doc, rows, targets, reported)

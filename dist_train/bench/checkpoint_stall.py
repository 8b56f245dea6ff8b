"""The training time a checkpoint save costs, written in place against `checkpoint.async`.

Both sides run `dist_train.train.loop.train` unmodified on the same 2 gloo ranks (one thread each):
the `llama` model under FSDP2 per block, the same byte corpus, global batch, seed and steps, a save
every `every` steps; only `checkpoint.async` differs. Sides alternate over repeats (sync, async;
async, sync; ...). A save's stall is the wall time the training loop spends inside the save call
(`Hooks.on_save`, the figure logged as `checkpoint_stall_s`): for sync the whole save, for async the
wait for a previous save still in flight and the copy to host memory. Per save the slower rank's
figure counts (the next collective waits for it); the side's figure is the median over its saves.
Beside it: the mean step time (the loop's own window, which leaves save time out) and whether every
save of the async side was committed.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from typing import Any, Optional

import torch

from dist_train.bench.llama_runs import llama_model, run_overrides
from dist_train.bench.report import make_target, pick_size

WORLD = 2
# What the fork server the ranks are forked from imports once (torch's import, seconds on a loaded
# machine, is then paid once rather than by each rank).
PRELOAD = ("torch", "torch.distributed", "dist_train.train.loop", "dist_train.bench.checkpoint_stall")
SIDES = ("sync", "async")
TARGET = 0.2
# The checkpoint holds the weights and AdamW's two moments in fp32: at width 256 about 10 MB per
# block, at width 512 about 35 MB, so the full size writes about 280 MB per save (the write, not
# the fixed cost of a save's barriers and planning, is what a large model's stall is made of).
SIZES = {
    "full": {"n_layer": 8, "width": 512, "n_head": 8, "n_kv_heads": 4, "block": 128, "batch": 8,
             "steps": 12, "every": 3, "repeats": 3},
    "quick": {"n_layer": 4, "width": 256, "n_head": 8, "n_kv_heads": 4, "block": 64, "batch": 8,
              "steps": 9, "every": 3, "repeats": 2},
    "smoke": {"n_layer": 1, "width": 32, "n_head": 2, "n_kv_heads": 1, "block": 16, "batch": 4,
              "steps": 4, "every": 2, "repeats": 1},
}


def _overrides(size: dict, run_dir: str, name: str, side: str) -> list[str]:
    saves = size["steps"] // size["every"]
    return run_overrides(size, run_dir, name, size["steps"], llama_model(size),
                         f"checkpoint.every={size['every']}", f"checkpoint.keep={max(1, saves)}",
                         f"checkpoint.async={'true' if side == 'async' else 'false'}")


def _pass(cfg, ctx, inner) -> dict[str, Any]:
    """One run: each save's stall (the slower rank's), the step time, and which saves are committed."""
    from pathlib import Path

    from dist_train.train import loop
    from dist_train.train.checkpoint import committed_checkpoints
    from dist_train.train.hooks import Hooks

    stalls: list[float] = []
    last = loop.train(cfg, ctx, ["dist-train", "bench", "checkpoint-stall"], data=inner,
                      hooks=Hooks(on_save=lambda _step, stall: stalls.append(stall)))
    mine = torch.tensor(stalls, dtype=torch.float64)
    torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MAX)
    root = Path(cfg.run.dir) / cfg.run.name / "checkpoints"
    want = list(range(cfg.checkpoint.every, cfg.train.steps + 1, cfg.checkpoint.every))
    return {"stalls_s": mine.tolist(), "step_s": float(last["step_time_s"]),
            "committed": [s for s, _ in committed_checkpoints(root)] == want}


def _worker(rank: int, world: int, size: dict, run_dir: str) -> dict[str, Any]:
    from dist_train.config import load_config
    from dist_train.data import build_dataset
    from dist_train.runtime import discover, init_distributed

    setup = load_config(None, _overrides(size, run_dir, "setup", "sync"))
    ctx = init_distributed(setup, discover())
    inner = build_dataset(setup.data, size["block"])
    rows = []
    try:
        for r in range(size["repeats"]):
            for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                cfg = load_config(None, _overrides(size, run_dir, f"{side}-{r}", side))
                rows.append({"side": side, "repeat": r + 1, **_pass(cfg, ctx, inner)})
    finally:
        ctx.destroy()
    return {"rows": rows, "threads": torch.get_num_threads()}


def _checkpoint_bytes(run_dir: str) -> int:
    from pathlib import Path

    folders = sorted(Path(run_dir).glob("sync-0/checkpoints/step-*"))
    return sum(f.stat().st_size for f in folders[0].iterdir()) if folders else 0


def measure_stall(size: Optional[dict] = None, quick: bool = False) -> dict[str, Any]:
    """Run both sides; return {"setup", "rows", "targets", "reported"} for a benchmark document.
    `size`: the keys of `SIZES` entries (default: the full or quick size, `pick_size`)."""
    from dist_train.bench._spawn import run_on_ranks

    size_name, picked = pick_size(SIZES, quick)
    size = {**picked, **(size or {})}
    with tempfile.TemporaryDirectory(prefix="dist-train-bench-stall-") as tmp:
        out = run_on_ranks(_worker, nprocs=WORLD, args=(size, tmp), threads=1, preload=PRELOAD, env=dict(os.environ))
        ckpt_bytes = _checkpoint_bytes(tmp)
    rows = [{"side": r["side"], "repeat": r["repeat"], "stall_s": statistics.median(r["stalls_s"]),
             "saves": len(r["stalls_s"]), "step_s": r["step_s"], "committed": r["committed"]} for r in out["rows"]]
    stall = {s: statistics.median(x for r in out["rows"] if r["side"] == s for x in r["stalls_s"]) for s in SIDES}
    step = {s: statistics.median(r["step_s"] for r in rows if r["side"] == s) for s in SIDES}
    committed = all(r["committed"] for r in rows)
    targets = [make_target("stall_async_vs_sync", stall["async"] / stall["sync"] if stall["sync"] else None,
                           "<=", TARGET, "median training time lost per save (the loop's time inside the save "
                           "call, slower rank), checkpoint.async over synchronous saves")]
    reported = [
        {"metric": "stall_sync_s", "value": stall["sync"], "description": "median stall per synchronous save (s)"},
        {"metric": "stall_async_s", "value": stall["async"], "description": "median stall per async save (s)"},
        {"metric": "step_s_sync", "value": step["sync"], "description": "median step time, sync side (s; saves excluded)"},
        {"metric": "step_s_async", "value": step["async"],
         "description": "median step time, async side (s; saves excluded, background writes included)"},
        {"metric": "async_step_slowdown_s_per_save", "value": (step["async"] - step["sync"]) * size["steps"] / max(1, size["steps"] // size["every"]),
         "description": "what the background writes cost the steps beside them, per save: (async - sync step "
                        "time) x steps / saves (s); on this machine the writer shares the ranks' cores"},
        {"metric": "async_all_committed", "value": float(committed),
         "description": "1 when every save of every run was committed (COMMITTED marker present)"},
    ]
    setup = {"size": size_name, **size, "world_size": WORLD, "threads_per_rank": out["threads"],
             "backend": "fsdp (FSDP2, per block)", "model": "llama", "data": "stdlib_bytes (vocab 256)",
             "checkpoint_bytes": ckpt_bytes, "figure": "medians over saves; sides alternate per repeat"}
    return {"setup": setup, "rows": rows, "targets": targets, "reported": reported}

"""Wall time per training step of each arm of `dist-train bench optimizers`, where the optimizer's own
cost shows: 2 gloo ranks, one thread each, DDP, the matrix optimizers owner-computes (each hidden
matrix orthogonalised by one rank, then broadcast; `optim.matrix.owner_compute`, the default).

The whole step is timed (forward, backward, gradient all-reduce, optimizer step), as the training
sampler sees it (`bench/overhead.py:step_timing`: from one step's batch request to the next's, on the
slower rank), with data prefetching off. Arms alternate (reversed every other repeat) and each
figure is the median over repeats of a run's mean step time. Every arm runs at its starting setting:
the hyperparameters' values do not change the work of a step.
"""

from __future__ import annotations

import statistics
from typing import Any

from dist_train.bench import optimizer_space as space
from dist_train.bench.optimizer_study import COMMON, model_overrides

WORLD = 2
PRELOAD = ("torch", "torch.distributed", "dist_train.train.loop", "dist_train.optim")


def _worker(rank: int, world: int, size: dict[str, Any], run_dir: str) -> list[dict[str, Any]]:
    from dist_train.bench.overhead import SharedData, step_timing
    from dist_train.config import load_config
    from dist_train.data import build_dataset
    from dist_train.runtime import discover, init_distributed
    from dist_train.train.loop import train

    timing = size["timing"]
    steps = timing["warmup"] + timing["measured"] + 1  # the last measured step ends at the next batch request

    def cfg(arm: str, model: str, name: str):
        return load_config(None, [*COMMON, *model_overrides(size, model), *space.overrides(arm, space.start(arm), steps),
                                  "parallel.backend=ddp", f"train.steps={steps}", f"train.log_every={steps}",
                                  "train.eval_batches=1", f"run.dir={run_dir}", f"run.name={name}"])

    first = cfg("adamw", next(iter(size["models"])), "setup")
    ctx = init_distributed(first, discover())
    inner = {model: build_dataset(cfg("adamw", model, "setup").data, size["block"]) for model in size["models"]}
    rows = []
    try:
        for repeat in range(timing["repeats"]):
            arms = list(space.ARMS) if repeat % 2 == 0 else list(space.ARMS)[::-1]
            for model in size["models"]:
                for arm in arms:
                    data = SharedData(inner[model])
                    train(cfg(arm, model, f"{arm}-{model}-{repeat}"), ctx, ["dist-train", "bench", "optimizers"],
                          data=data)
                    t = step_timing(data.train_sampler, timing["warmup"], timing["measured"])
                    rows.append({"arm": arm, "model": model, "repeat": repeat + 1, **t})
    finally:
        ctx.destroy()
    return rows


def step_times(size: dict[str, Any], run_dir: str) -> tuple[dict[tuple[str, str], float], list[dict[str, Any]]]:
    """({(arm, model): median over repeats of the mean step seconds}, one row per timed run)."""
    from dist_train.bench._spawn import run_on_ranks

    rows = run_on_ranks(_worker, nprocs=WORLD, args=(size, run_dir), threads=1, preload=PRELOAD)
    medians = {(arm, model): statistics.median(r["step_s"] for r in rows if r["arm"] == arm and r["model"] == model)
               for arm in space.ARMS for model in size["models"]}
    return medians, rows

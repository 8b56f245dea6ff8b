"""`dist-train bench energy`: what energy telemetry costs, measured against the same training with it off.

Acceptance: the framework's steady-state step time with energy telemetry on is within 1% of the
same run with `telemetry.energy: none` (target: median ratio on/off <= 1.01).

A ("on")  `dist_train.train.loop.train`, unmodified, with `telemetry.energy` measuring: NVML on a
          machine that has it; elsewhere a stand-in pynvml module (below) whose counter is a Python
          function, so the figure then covers everything dist-train itself does — the meter read at
          each logging window, the GPU statistics, the all-gather of every rank's figures, the
          derived figures, the running total and the per-rank TensorBoard scalars — but not the
          cost of a real NVML call (microseconds; measured when the benchmark runs on a GPU).
B ("off") the same with `telemetry.energy: none`: no meter and no collective.

Everything else is identical and kept as a user would run it: the quickstart model with DDP on 2
ranks (gloo, one thread each), metrics and TensorBoard every 10 steps (the quickstart's interval).
The two runs train in lockstep inside each worker (the pairing of `bench overhead`: two threads
hand a baton over at every step boundary, so shared-machine load hits both alike) and a step's
time is the sampler clock's, on the slower rank. Beside the A/B ratio, the time spent inside the
energy windows themselves is clocked directly in A: a second, low-noise view of the same cost.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time
import types
from typing import Any
from unittest import mock

from dist_train.bench.overhead import SharedData, bench_config, lockstep, step_timing
from dist_train.bench.report import command_line, document, make_target, pick_size, utc_now

TARGET_RATIO = 1.01
WORLD = 2
# What the fork server the ranks are forked from imports once (torch's import, seconds on a loaded
# machine, is then paid once rather than by each rank).
PRELOAD = ("torch", "torch.distributed", "dist_train.train.loop", "dist_train.bench.energy")
LOG_EVERY = 10
SIZES = {
    "full": {"repeats": 8, "warmup": 10, "measured": 100},
    "quick": {"repeats": 3, "warmup": 10, "measured": 40},
    "smoke": {"repeats": 1, "warmup": 2, "measured": 4},  # tests: runs, measures nothing
}


def stand_in_pynvml(watts: float = 300.0) -> types.ModuleType:
    """A pynvml-shaped module for machines without a GPU: one device whose energy counter grows at
    `watts` with the clock. Only the benchmark uses it, and its documents say so."""
    nvml = types.ModuleType("pynvml")
    util, mem = types.SimpleNamespace(gpu=90, memory=50), types.SimpleNamespace(used=2**30, total=80 * 2**30)
    nvml.NVML_TEMPERATURE_GPU = 0
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: 1
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetUUID = lambda h: f"GPU-stand-in-{h}"
    nvml.nvmlDeviceGetTotalEnergyConsumption = lambda h: int(time.monotonic() * 1000 * watts)
    nvml.nvmlDeviceGetPowerUsage = lambda h: int(watts * 1000)
    nvml.nvmlDeviceGetUtilizationRates = lambda h: util
    nvml.nvmlDeviceGetMemoryInfo = lambda h: mem
    nvml.nvmlDeviceGetTemperature = lambda h, sensor: 65
    return nvml


def _real_nvml() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def _worker(rank: int, world: int, size: dict[str, int], run_dir: str) -> dict[str, Any]:
    import torch

    from dist_train.data import build_dataset
    from dist_train.runtime import discover, init_distributed
    from dist_train.telemetry.energy_log import EnergyLog
    from dist_train.train import loop

    warmup, measured = size["warmup"], size["measured"]
    real = torch.cuda.is_available() and _real_nvml()
    if not real:
        sys.modules["pynvml"] = stand_in_pynvml()
    on = ("telemetry.energy=nvml", "telemetry.tensorboard=true", f"train.log_every={LOG_EVERY}")
    off = ("telemetry.energy=none", "telemetry.tensorboard=true", f"train.log_every={LOG_EVERY}")
    cfg0 = bench_config(run_dir, "setup", warmup, measured, on)
    ctx = init_distributed(cfg0, discover())
    inner = build_dataset(cfg0.data, cfg0.model.block_size)

    windows: list[tuple[str, float]] = []  # (meter source, seconds inside EnergyLog.window)
    original_window = EnergyLog.window

    def timed_window(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original_window(self, *args, **kwargs)
        finally:
            windows.append((self.source, time.perf_counter() - t0))

    def arm(name: str, overrides: tuple[str, ...], data: SharedData) -> dict[str, Any]:
        cfg = bench_config(run_dir, name, warmup, measured, overrides)
        last = loop.train(cfg, ctx, ["dist-train", "bench", "energy"], data=data)  # each arm its timed view
        return {**step_timing(data.train_sampler, warmup, measured), "source": last.get("energy_source")}

    runs = []
    with mock.patch.object(EnergyLog, "window", timed_window):
        try:
            for r in range(size["repeats"]):
                order = "AB" if r % 2 == 0 else "BA"
                arms = {"A": lambda data, r=r: arm(f"on-{r}", on, data),
                        "B": lambda data, r=r: arm(f"off-{r}", off, data)}
                windows.clear()
                gc.collect()
                ctx.barrier()
                res = lockstep(arms, inner, first=order[0])
                in_window = [dt for source, dt in windows if source != "unavailable"]
                runs.append({"order": order, "A": res["A"], "B": res["B"],
                             "window_s": statistics.median(in_window) if in_window else None,
                             "windows": len(in_window)})
        finally:
            ctx.destroy()
    return {"runs": runs, "real_nvml": real, "batch_size": cfg0.train.batch_size,
            "device": str(ctx.device), "threads": torch.get_num_threads()}


def run(quick: bool) -> dict[str, Any]:
    from dist_train.bench._spawn import run_on_ranks

    size_name, size = pick_size(SIZES, quick)
    command, started = command_line(), utc_now()
    with tempfile.TemporaryDirectory(prefix="dist-train-bench-energy-") as run_dir:
        out = run_on_ranks(_worker, nprocs=WORLD, args=(size, run_dir), threads=1,
                           preload=PRELOAD, env=dict(os.environ))

    rows = []
    for i, r in enumerate(out["runs"]):
        a, b = r["A"], r["B"]
        window_share = r["window_s"] / (LOG_EVERY * a["step_s"]) if r["window_s"] is not None else None
        rows.append({"repeat": str(i + 1), "order": r["order"], "on_source": a["source"],
                     "on_step_ms": a["step_s"] * 1e3, "off_step_ms": b["step_s"] * 1e3,
                     "ratio": a["step_s"] / b["step_s"], "ratio_p50": a["p50_s"] / b["p50_s"],
                     "window_ms": r["window_s"] * 1e3 if r["window_s"] is not None else None,
                     "window_share_of_step_time": window_share})
    median = {"repeat": "median", "order": "", "on_source": rows[0]["on_source"]}
    for key in ("on_step_ms", "off_step_ms", "ratio", "ratio_p50", "window_ms", "window_share_of_step_time"):
        values = [row[key] for row in rows if row[key] is not None]
        median[key] = statistics.median(values) if values else None
    rows.append(median)
    nvml = ("real NVML" if out["real_nvml"] else
            "stand-in pynvml (no GPU here): dist-train's own telemetry work, not a real NVML call's cost")
    setup = {"size": size_name, **size, "world_size": WORLD, "threads_per_rank": out["threads"],
             "device": out["device"], "global_batch": out["batch_size"], "log_every": LOG_EVERY,
             "on": f"telemetry.energy=nvml ({nvml}), TensorBoard on",
             "off": "telemetry.energy=none, TensorBoard on",
             "model": "quickstart GPT (4 layers, width 128, 4 heads, block 64, vocab 256), DDP",
             "pairing": "lockstep (baton at every step boundary), order alternating AB/BA",
             "clock": "StepSampler stamps per step, slower rank, mean over the measured steps"}
    targets = [make_target("energy_telemetry_overhead", median["ratio"], "<=", TARGET_RATIO,
                           description="step time with energy telemetry on / off (median over lockstep repeats); "
                                       "<= 1.01 = under 1% overhead")]
    reported = [{"metric": "energy_window_share_of_step_time", "value": median["window_share_of_step_time"],
                 "description": f"time inside one energy window (meter read, GPU stats, all-gather) / the "
                                f"{LOG_EVERY} steps it covers, clocked directly in the on-run"}]
    return document("energy", command, started, setup, rows, targets, reported)

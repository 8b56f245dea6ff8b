"""The memory refusal: a run whose planned memory per rank exceeds what a rank has is refused before
anything starts (`runtime.memory_check`), instead of failing minutes later with an out-of-memory
kill. The plan's figures are `dist-train plan`'s own (`train/plan.py:estimate`)."""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from dist_train.config.schema import Config
from dist_train.errors import UserError
from dist_train.train.plan import Estimate, estimate


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def available_ram() -> int:
    """Bytes of RAM the kernel says can be allocated without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_per_rank(cfg: Config, local_ranks: int, device: Optional[torch.device] = None) -> tuple[float, str]:
    """(bytes a rank may use, how that figure was found). On CUDA: the free memory of the rank's
    device (`device`; else the least free of this node's GPUs) over the ranks sharing a GPU; on CPU:
    the node's available RAM over its `local_ranks` ranks."""
    if cfg.runtime.memory_per_rank_gb is not None:
        return cfg.runtime.memory_per_rank_gb * 2**30, "runtime.memory_per_rank_gb"
    if cfg.runtime.device != "cpu" and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        sharing = math.ceil(local_ranks / gpus)
        free = (torch.cuda.mem_get_info(device)[0] if device is not None and device.type == "cuda"
                else min(torch.cuda.mem_get_info(i)[0] for i in range(gpus)))
        return free / sharing, f"{_gib(free)} free on the GPU" + (f" / {sharing} ranks" if sharing > 1 else "")
    ram = available_ram()
    return ram / local_ranks, f"{_gib(ram)} available RAM" + (f" / {local_ranks} ranks" if local_ranks > 1 else "")


def check_memory(cfg: Config, world: int, local_ranks: int, data=None,
                 device: Optional[torch.device] = None) -> Estimate:
    """UserError with the plan's figures and the key that lifts the check when a rank's planned
    memory exceeds `memory_per_rank`; the estimate otherwise (the model checked against what the
    config's features need of it, even with the check off)."""
    e = estimate(cfg, world, data)
    if not cfg.runtime.memory_check:
        return e
    have, source = memory_per_rank(cfg, local_ranks, device)
    if e.total > have:
        raise UserError(f"runtime.memory_check: the plan needs ~{_gib(e.total)} per rank ({e.figures()}) but a rank "
                        f"has {_gib(have)} ({source}); shrink the run (model.block_size, train.batch_size, "
                        f"more ranks or another parallel.backend) or set runtime.memory_check=false to start anyway")
    return e

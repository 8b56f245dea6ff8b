"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (or constant).

A pure function of the step, so a resumed run needs nothing but the step to continue exactly.
"""

from __future__ import annotations

import math

from dist_train.config.schema import OptimSection


def lr_at(step: int, cfg: OptimSection, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))

"""Checks that need the world size as well as the config: is this run possible on these ranks?

No rule lives here: each component the config names checks its own (`check(cfg, world_size)`), in
the order the old single if-chain ran them, so the first message a user sees is unchanged."""

from __future__ import annotations

from dist_train.config.schema import Config
from dist_train.local.layout import check_pipeline, check_replay
from dist_train.registry import BACKENDS, DATASETS, LOCAL_METHODS, MODELS, OPTIMIZERS
from dist_train.tasks import get_task


def check_layout(cfg: Config, world_size: int) -> None:
    """Raise UserError naming the key when the config cannot run on `world_size` ranks."""
    get_task(MODELS.get(cfg.model.name).task).check(cfg, world_size)  # e.g. the PDE task: ddp or none only
    DATASETS.get(cfg.data.name).check(cfg, world_size)
    if cfg.parallel.stages > 1:
        check_pipeline(cfg, world_size)
        LOCAL_METHODS.get(cfg.local.method).check(cfg, world_size)
        check_replay(cfg, world_size)
    BACKENDS.get(cfg.parallel.backend).check(cfg, world_size)
    OPTIMIZERS.get(cfg.optim.name).check(cfg, world_size)

"""Checks that need the world size as well as the config: is this run possible on these ranks?"""

from __future__ import annotations

from dist_train.config.schema import Config
from dist_train.errors import UserError


def check_layout(cfg: Config, world_size: int) -> None:
    """Raise UserError naming the key when the config cannot run on `world_size` ranks."""
    if cfg.parallel.stages > 1:
        raise UserError(f"parallel.stages: {cfg.parallel.stages} local-learning stages are not available in "
                        "this release; use parallel.stages=1 (end-to-end backprop)")
    if cfg.parallel.backend == "none" and world_size > 1:
        raise UserError(f"parallel.backend: none runs one process, but {world_size} ranks were requested")
    per_step = world_size * cfg.train.grad_accum
    if cfg.train.batch_size % per_step != 0:
        raise UserError(f"train.batch_size: {cfg.train.batch_size} is not divisible by world size x grad_accum "
                        f"({world_size} x {cfg.train.grad_accum} = {per_step})")
    if cfg.model.name == "gpt" and cfg.parallel.stages > cfg.model.n_layer:
        raise UserError(f"parallel.stages: {cfg.parallel.stages} stages but the model has only "
                        f"{cfg.model.n_layer} layers")

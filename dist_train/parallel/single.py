"""No parallelism: one process, no process group. The reference every backend is tested against."""

from __future__ import annotations

from torch import nn

from dist_train.errors import UserError
from dist_train.parallel.base import Backend, OptimizerFactory


class SingleProcess(Backend):
    name = "none"

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        if world_size > cfg.parallel.stages:  # a pipeline runs one unwrapped process per stage
            raise UserError(f"parallel.backend: none runs one process, but {world_size} ranks were requested")
        super().check(cfg, world_size)  # e.g. parallel.dp_replicate, which needs a sharding backend

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        self.model = self.module = model
        self.optimizer = make_optimizer(model, None).build()

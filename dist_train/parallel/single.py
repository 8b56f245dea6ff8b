"""No parallelism: one process, no process group. The reference every backend is tested against."""

from __future__ import annotations

from torch import nn

from dist_train.parallel.base import Backend, OptimizerFactory


class SingleProcess(Backend):
    name = "none"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        self.model = self.module = model
        self.optimizer = make_optimizer(model, None).build()

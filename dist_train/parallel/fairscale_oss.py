"""FairScale OSS (optimizer-state sharding) with ShardedDataParallel (gradients reduced to their owner).

FairScale's last release is from 2022; its FSDP does not run on current torch, but OSS and
ShardedDataParallel do, so it is offered as an optional backend (`pip install dist-train[fairscale]`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from dist_train.config.schema import Config
from dist_train.errors import UserError
from dist_train.parallel.base import Backend, OptimizerFactory


class FairScaleBackend(Backend):
    name = "fairscale"
    flattens_parameters = True
    compiles_blocks = False  # not tested with compiled blocks: refused rather than assumed
    in_stages = False  # its OSS wrapper over a stage sub-mesh is not offered
    async_checkpoints = False  # each rank's optimizer shard is a file of its own, beside DCP's

    @classmethod
    def bytes_per_param(cls, world: int, cfg: Config) -> tuple[float, float, float]:
        return 4.0, 4.0 / world, 8.0 / world

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        try:
            from fairscale.nn.data_parallel import ShardedDataParallel
            from fairscale.optim.oss import OSS
        except ImportError:
            raise UserError("parallel.backend: fairscale is not installed (pip install fairscale)") from None
        spec = make_optimizer(model, self.mesh)
        self.optimizer = OSS(spec.param_groups, optim=spec.cls, **spec.kwargs)
        self.module = model
        self.model = ShardedDataParallel(model, self.optimizer)

    @contextlib.contextmanager
    def sync_context(self, is_last: bool) -> Iterator[None]:
        with (contextlib.nullcontext() if is_last else self.model.no_sync()):
            yield

    # The model is a full replica (saved with DCP); each rank's optimizer shard is its own file.
    def save(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save({"model": self.module.state_dict()}, checkpoint_id=path)
        torch.save(self.optimizer.optim.state_dict(), Path(path) / f"oss_rank{self.ctx.rank}.pt")

    def load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp

        state = {"model": self.module.state_dict()}
        dcp.load(state, checkpoint_id=path)
        self.module.load_state_dict(state["model"])
        shard = Path(path) / f"oss_rank{self.ctx.rank}.pt"
        if not shard.is_file():
            raise UserError(f"checkpoint {path}: no optimizer shard for rank {self.ctx.rank} "
                            "(was it saved with a different number of ranks?)")
        self.optimizer.optim.load_state_dict(torch.load(shard, weights_only=True))

    def zero_grad(self) -> None:
        # ShardedDDP's reduce hooks hold views of the gradients; keep the tensors, zero them.
        self.model.zero_grad(set_to_none=False)

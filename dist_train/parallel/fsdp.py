"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the dp mesh.

Each block in `model.blocks` is its own FSDP unit (all-gathered just before it runs, freed after),
then the root, which holds the embedding and head. The model file knows nothing of this.

HSDP (`parallel.dp_replicate` > 1): the same units over the 2-D ("dp_replicate", "dp_shard") mesh:
FSDP2 shards each parameter along dp_shard and replicates it along dp_replicate; gradients are
reduce-scattered inside a shard group, then all-reduced across the replicas.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator

import torch
from torch import nn

from dist_train.parallel.base import Backend, OptimizerFactory


class FSDPBackend(Backend):
    name = "fsdp"
    shards_parameters = True
    owner_computes = True
    shards_meta_model = True
    hybrid_shards = True

    @classmethod
    def bytes_per_param(cls, world: int, cfg) -> tuple[float, float, float]:
        shard = max(1, world // cfg.parallel.dp_replicate)  # HSDP: sharded over a shard group only
        return 4.0 / shard, 4.0 / shard, 8.0 / shard

    @classmethod
    def plan_rows(cls, cfg, plan) -> None:
        r = cfg.parallel.dp_replicate
        if r > 1:
            plan.set("hsdp", f"each parameter sharded over the {plan.dp // r} rank(s) of a shard group (dp_shard) and "
                             f"replicated over {r} groups (dp_replicate): all-gathers and reduce-scatters inside a "
                             f"group, one gradient all-reduce across groups; a rank holds 1/{plan.dp // r} of the "
                             f"weights, gradients and optimizer state (1/{plan.dp} without HSDP)",
                     before="model")

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from dist_train.parallel.meta_init import is_on_meta, materialize

        mp = None
        if self.cfg.parallel.mixed_precision == "bf16":
            # Compute in bf16, reduce gradients in fp32 so accumulation over ranks loses nothing.
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kwargs = {"mesh": self.shard_mesh, "reshard_after_forward": self.cfg.parallel.reshard_after_forward}
        if mp is not None:
            kwargs["mp_policy"] = mp
        # A model may name its own sharding units (a pipeline stage does); otherwise its blocks.
        units = model.fsdp_units() if hasattr(model, "fsdp_units") else getattr(model, "blocks", [])
        for block in units:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        if is_on_meta(model):  # built on meta: each rank allocates and initialises only its shard
            materialize(model, self.ctx.device, self.cfg.train.seed)
        self.model = self.module = model
        self.optimizer = make_optimizer(model, self.mesh).build()

    def autocast(self) -> ContextManager:
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts parameters itself

    @contextlib.contextmanager
    def sync_context(self, is_last: bool) -> Iterator[None]:
        # Skip the reduce-scatter on all but the last micro-batch; gradients accumulate unsharded.
        self.model.set_requires_gradient_sync(is_last)
        yield

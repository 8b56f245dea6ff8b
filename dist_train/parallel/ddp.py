"""DistributedDataParallel: full replicas, gradients all-reduced in buckets during backward."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train.parallel.base import Backend, OptimizerFactory


class DDPBackend(Backend):
    name = "ddp"
    owner_computes = True

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> None:
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        self.module = model
        spec = make_optimizer(model, self.mesh)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if trainable <= set(spec.self_reduced):
            # Everything is reduced elsewhere (DP-SGD adds its noise before it reduces): DDP would
            # have nothing to do. Replicas start equal because every rank seeds the same init.
            self.model = model
        else:
            if spec.self_reduced:
                # Owner-computes Muon reduce-scatters these gradients to their owners itself; DDP's
                # all-reduce of them would be the same bytes spent twice.
                DDP._set_params_and_buffers_to_ignore_for_model(model, spec.self_reduced)
            # gradient_as_bucket_view saves one gradient-sized copy per step.
            self.model = DDP(model, device_ids=device_ids, gradient_as_bucket_view=True,
                             process_group=self.mesh.get_group())
        self.optimizer = spec.build()

    @contextlib.contextmanager
    def sync_context(self, is_last: bool) -> Iterator[None]:
        # no_sync must wrap forward too: DDP decides at forward time whether backward reduces.
        with (contextlib.nullcontext() if is_last or self.model is self.module else self.model.no_sync()):
            yield

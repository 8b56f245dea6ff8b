"""Validation: mean loss (and accuracy for classifiers) over a fixed set of validation batches."""

from __future__ import annotations

import torch

from dist_train.data.sampler import rank_slice
from dist_train.parallel.base import Backend
from dist_train.runtime.dist import DistContext


@torch.no_grad()
def evaluate(backend: Backend, data, ctx: DistContext, batch_size: int, batches: int) -> dict[str, float]:
    model = backend.model
    was_training = model.training
    model.eval()
    sampler = data.sampler("val", 0, batch_size)
    loss_sum, correct, count = 0.0, 0.0, 0
    for i in range(batches):
        idx = rank_slice(sampler.global_indices(i), ctx.rank, ctx.world_size)
        x, y = (t.to(ctx.device, non_blocking=True) for t in data.get_batch("val", idx))
        with backend.autocast():
            out = model(x)
        loss_sum += float(backend.module.loss(out.float(), y))
        if backend.module.task == "classify":
            correct += float((out.argmax(-1) == y).float().mean())
        count += 1
    model.train(was_training)
    metrics = {"val_loss": ctx.all_reduce_mean(loss_sum / count)}
    if backend.module.task == "classify":
        metrics["val_acc"] = ctx.all_reduce_mean(correct / count)
    return metrics

"""Validation: mean loss, plus the task's own metrics (accuracy for classifiers), over a fixed set of
validation batches (or of another held-out split: a benchmark that chooses on validation reports on
the test split)."""

from __future__ import annotations

from collections import defaultdict

import torch

from dist_train.data.sampler import rank_slice
from dist_train.parallel.base import Backend
from dist_train.runtime.dist import DistContext
from dist_train.tasks import get_task


@torch.no_grad()
def evaluate(backend: Backend, data, ctx: DistContext, batch_size: int, batches: int,
             split: str = "val") -> dict[str, float]:
    """Metrics named `<split>_loss`, `<split>_<metric>`: means over the same `batches` batches of `split`
    at every call (its sampler is seeded 0), averaged over the ranks."""
    model = backend.model
    task = get_task(data.info.task)
    was_training = model.training
    model.eval()
    sampler = data.sampler(split, 0, batch_size)
    loss_sum, sums = 0.0, defaultdict(float)
    for i in range(batches):
        idx = rank_slice(sampler.global_indices(i), ctx.rank, ctx.world_size)
        x, y = (t.to(ctx.device, non_blocking=True) for t in data.get_batch(split, idx))
        with backend.autocast():
            out = model(x)
        loss_sum += float(backend.module.loss(out.float(), y))
        for key, value in task.eval_sums(out, y, backend.module).items():
            sums[key] += value
    model.train(was_training)
    metrics = {f"{split}_loss": ctx.all_reduce_mean(loss_sum / batches)}
    metrics.update({f"{split}_{key}": ctx.all_reduce_mean(value / batches) for key, value in sums.items()})
    return metrics

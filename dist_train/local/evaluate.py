"""Evaluation and generation through all stages of a local-learning pipeline (main path only;
auxiliary heads are training scaffolding).

Every data-parallel replica runs its own chain of stages (stage k, replica d talks to stage k±1,
replica d), so an FSDP2 or DeepSpeed stage's collectives see all of its replicas.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from dist_train.local.link import EVAL_TAG, GEN_TAG
from dist_train.models.loss import cross_entropy
from dist_train.models.sampling import decode, next_token, prompt_ids
from dist_train.tasks import get_task


@torch.no_grad()
def evaluate_pipeline(cfg, ctx, data, backend, link, layout, split: str = "val") -> dict:
    """Mean validation loss (and accuracy for classifiers) on the last stage, over the replicas."""
    model = backend.model
    model.eval()
    stage = backend.module
    sampler = data.sampler(split, 0, cfg.train.batch_size)
    task = get_task(backend.module.info.task)
    loss_sum, sums = 0.0, defaultdict(float)
    for i in range(cfg.train.eval_batches):
        idx = sampler.next_indices(layout.dp_rank, layout.dp_size)
        x = received = None
        if stage.reads_data or not stage.receives_activations:
            x, y = (t.to(ctx.device) for t in data.get_batch(split, idx))
        if not layout.first:
            received, y = link.recv(i, tag=EVAL_TAG, prefetch=False)
        with backend.autocast():
            out = model(x=x, received=received)
        if layout.last:
            loss_sum += float(cross_entropy(out.float(), y))
            for key, value in task.eval_sums(out, y, backend.module).items():
                sums[key] += value
        else:
            link.send(out, y, i, tag=EVAL_TAG)
    link.drain()
    model.train()
    if not layout.last:
        return {}
    metrics = {f"{split}_loss": replica_mean(backend, loss_sum / cfg.train.eval_batches)}
    metrics.update({f"{split}_{key}": replica_mean(backend, value / cfg.train.eval_batches)
                    for key, value in sums.items()})
    return metrics


def replica_mean(backend, value: float) -> float:
    """Mean of a scalar over this stage's data-parallel replicas."""
    if backend.dp_size == 1:
        return value
    return backend.ctx.all_reduce_mean(value, group=backend.mesh.get_group())


@torch.no_grad()
def generate_pipeline(cfg, ctx, data, backend, layout) -> str | None:
    """Sample `train.sample_tokens` tokens through the stages, one token per trip; stage 0 gets the text.

    Each trip sends the context ids with the activation (NoProp stages read the ids themselves);
    the last stage samples the next token and returns it to stage 0. That token is the one message
    going backward, an integer at inference time; training never sends anything back.
    """
    model = backend.model
    model.eval()
    independent = not backend.module.receives_activations
    first_rank = layout.dp_rank  # stage 0, this replica
    last_rank = (layout.num_stages - 1) * layout.dp_size + layout.dp_rank
    gen = torch.Generator().manual_seed(cfg.train.seed)
    ids = prompt_ids(cfg, data) if layout.first else None
    prompt_len = 0 if ids is None else len(ids)
    for _ in range(cfg.train.sample_tokens):
        if layout.first:
            window = ids[-cfg.model.block_size:].view(1, -1).to(ctx.device)
            received = None
        else:
            window, received = _recv_trip(layout.prev_rank, ctx.device, backend.module.info.width)
        with backend.autocast():
            out = model(x=window if (layout.first or independent) else None, received=received)
        if not layout.last:
            _send_trip(layout.next_rank, window, out.float())
            if layout.first:
                nxt = torch.zeros(1, dtype=torch.long, device=ctx.device)
                dist.recv(nxt, last_rank, tag=GEN_TAG)
                ids = torch.cat([ids, nxt.cpu()])
            continue
        nxt = next_token(out, cfg.train.sample_temperature, gen)
        dist.send(nxt.to(ctx.device), first_rank, tag=GEN_TAG)
    model.train()
    if not layout.first:
        return None
    return decode(ids[prompt_len:].tolist(), data)


def _send_trip(dst: int, window: torch.Tensor, act: torch.Tensor) -> None:
    dist.send(torch.tensor([window.size(1)], dtype=torch.long, device=window.device), dst, tag=GEN_TAG)
    dist.send(window.contiguous(), dst, tag=GEN_TAG)
    dist.send(act.contiguous(), dst, tag=GEN_TAG)


def _recv_trip(src: int, device: torch.device, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = torch.zeros(1, dtype=torch.long, device=device)
    dist.recv(n, src, tag=GEN_TAG)
    window = torch.zeros(1, int(n), dtype=torch.long, device=device)
    dist.recv(window, src, tag=GEN_TAG)
    act = torch.zeros(1, int(n), width, dtype=torch.float32, device=device)
    dist.recv(act, src, tag=GEN_TAG)
    return window, act

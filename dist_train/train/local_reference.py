"""Local learning on one device: the stages of a local pipeline trained one after the other in a
single process. It is the arithmetic the multi-rank pipeline must reproduce step for step (the
tests prove it), and the cheap way to sweep seeds and learning rates for quality comparisons.
"""

from __future__ import annotations

from typing import Any

import torch

from dist_train.data import build_dataset
from dist_train.local.layout import stage_layout
from dist_train.models.loss import cross_entropy
from dist_train.optim import lr_at, optimizer_spec, set_lr
from dist_train.local.build import build_stage
from dist_train.local.methods.man import MANStage, ema_schedule, flat_block_weights
from dist_train.models.sampling import decode, next_token, prompt_ids
from dist_train.tasks import get_task


def local_reference(cfg, data=None) -> dict[str, Any]:
    """The local pipeline's arithmetic with its stages trained one after the other in one process
    (synchronous mode): per-stage loss per step, then the main path's validation loss/accuracy
    over the same validation batches the trainers evaluate on, and, when the data set has a test
    split, `test_loss` / `test_acc` (classifiers: over the whole test split). `data`: the data set
    `cfg.data` names, already built (a sweep reuses one across runs); default: build it."""

    if data is None:
        data = build_dataset(cfg.data, cfg.model.block_size)
    k_stages = cfg.parallel.stages
    parts = []
    for k in range(k_stages):
        trainer, info = build_stage(cfg, data.info, stage_layout(k, k_stages, k_stages))
        parts.append((trainer, optimizer_spec(cfg.optim, trainer, num_outputs=info.num_classes).build()))
    independent = not parts[0][0].receives_activations
    # Each pipeline stage draws its randomness (negatives, noise, dropout) from its own stream.
    streams = [torch.Generator().manual_seed(cfg.train.seed + 1000 * k) for k in range(k_stages)]
    # MAN: stage k+1's first block after each step, applied to stage k's EMA on the channel's schedule.
    man = isinstance(parts[0][0], MANStage)
    sent: list[dict[int, torch.Tensor]] = [{} for _ in parts]
    # NoProp with a learned label embedding: one U, its copies' gradients summed before the update
    # and the copies averaged after it (the pipeline's EmbeddingSync channel).
    shared_u = [t.label_embedding for t, _ in parts if isinstance(getattr(t, "label_embedding", None),
                                                                  torch.nn.Parameter)]
    sampler = data.sampler("train", cfg.train.seed, cfg.train.batch_size)
    losses: list[list[float]] = [[] for _ in parts]
    micro = cfg.train.grad_accum  # the pipeline streams the batch as micro-batches, accumulating
    for step in range(cfg.train.steps):
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        for _, opt in parts:
            set_lr(opt, lr)
        if man:
            for k, (trainer, _) in enumerate(parts[:-1]):
                method = trainer.method
                if ema_schedule(step, 0, method.every, method.delay):
                    method.update_ema(trainer.head, sent[k + 1].pop(step - method.delay))
        step_loss = [0.0] * k_stages
        for part in sampler.next_indices(0, 1).chunk(micro):
            x, y = data.get_batch("train", part)
            received = None
            for k, (trainer, _) in enumerate(parts):
                box: list = []
                torch.set_rng_state(streams[k].get_state())
                loss = trainer(x=x if trainer.reads_data else None, received=received, y=y,
                               on_activation=box.append)
                streams[k].set_state(torch.get_rng_state())
                received = None if independent else box[0].detach()
                (loss / micro).backward()
                step_loss[k] += float(loss.detach()) / micro
        if shared_u:
            total = torch.stack([u.grad for u in shared_u]).sum(0)
            for u in shared_u:
                u.grad = total.clone()
        for k, (trainer, opt) in enumerate(parts):
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainer.parameters(), cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[k].append(step_loss[k])
            if man and k > 0 and step % trainer.method.every == 0:
                sent[k][step] = flat_block_weights(trainer.blocks[0])
        if shared_u:
            with torch.no_grad():
                mean = torch.stack([u for u in shared_u]).mean(0)
                for u in shared_u:
                    u.copy_(mean)
    task = get_task(parts[-1][0].info.task)
    trainers = [t for t, _ in parts]
    with torch.no_grad():
        for trainer in trainers:
            trainer.eval()
        val_sampler = data.sampler("val", 0, cfg.train.batch_size)
        val = [val_sampler.next_indices(0, 1) for _ in range(cfg.train.eval_batches)]
        out = {"losses": losses, **_evaluate(trainers, task, data, "val", val)}
        if data.info.test_size:
            out.update(_evaluate(trainers, task, data, "test", _test_batches(cfg, data)))
        if cfg.train.sample_tokens and task.generates_text:
            out["sample"] = _sample(trainers, independent, cfg, data)
    return out


def _test_batches(cfg, data) -> list[torch.Tensor]:
    """The whole test split in order for a map-style data set; for a corpus (too many windows to
    visit) `train.eval_batches` batches drawn the way validation draws them."""
    if data.sampling == "epochs":
        return list(torch.arange(data.num_samples("test")).split(cfg.train.batch_size))
    sampler = data.sampler("test", 0, cfg.train.batch_size)
    return [sampler.next_indices(0, 1) for _ in range(cfg.train.eval_batches)]


def _evaluate(trainers, task, data, split: str, batches: list[torch.Tensor]) -> dict[str, float]:
    """`{split}_loss` and the task's own metrics (`{split}_acc` for classifiers) of the main path on
    `batches` of `split`, as the pipeline's evaluator names them. Validation (equal batches) is the
    mean of the per-batch means, as the trainers compute it; an unequal last batch (the test split
    walked in order) is weighted by its size, so the figures are per example."""
    sums: dict[str, float] = {}
    loss_sum, weight = 0.0, 0.0
    equal = split == "val"
    for idx in batches:
        x, y = data.get_batch(split, idx)
        h = None
        for trainer in trainers:
            h = trainer(x=x if trainer.reads_data else None, received=h)
        w = 1.0 if equal else float(len(idx))
        loss_sum += w * float(cross_entropy(h.float(), y))
        for key, value in task.eval_sums(h, y, trainers[-1]).items():
            sums[key] = sums.get(key, 0.0) + w * value
        weight += w
    return {f"{split}_loss": loss_sum / weight, **{f"{split}_{k}": v / weight for k, v in sums.items()}}


def _sample(trainers, independent: bool, cfg, data) -> str:
    """The pipeline's generation, with the stages chained in one process."""
    gen = torch.Generator().manual_seed(cfg.train.seed)
    ids = prompt_ids(cfg, data)
    start = len(ids)
    for _ in range(cfg.train.sample_tokens):
        window = ids[-cfg.model.block_size:].view(1, -1)
        h = None
        for trainer in trainers:
            h = trainer(x=window if trainer.reads_data else None, received=h)
        ids = torch.cat([ids, next_token(h, cfg.train.sample_temperature, gen)])
    return decode(ids[start:].tolist(), data.info.vocab_size)

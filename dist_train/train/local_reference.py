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
from dist_train.optim import lr_at, optimizer_spec
from dist_train.train.generate import decode, next_token, prompt_ids
from dist_train.train.local_stage import build_stage


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
        parts.append((trainer, optimizer_spec(cfg.optim, trainer).build()))
    independent = parts[0][0].method.independent_stages
    if independent:  # the pipeline's NoProp stages draw their noise from these streams
        streams = [torch.Generator().manual_seed(cfg.train.seed + 1000 * k) for k in range(k_stages)]
    sampler = data.sampler("train", cfg.train.seed, cfg.train.batch_size)
    losses: list[list[float]] = [[] for _ in parts]
    micro = cfg.train.grad_accum  # the pipeline streams the batch as micro-batches, accumulating
    for step in range(cfg.train.steps):
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        for _, opt in parts:
            for group in opt.param_groups:
                group["lr"] = lr
        step_loss = [0.0] * k_stages
        for part in sampler.next_indices(0, 1).chunk(micro):
            x, y = data.get_batch("train", part)
            h = x
            for k, (trainer, _) in enumerate(parts):
                if independent:
                    torch.set_rng_state(streams[k].get_state())
                    _, loss = trainer(x, y)
                    streams[k].set_state(torch.get_rng_state())
                else:
                    h, loss = trainer(h, y)
                    h = h.detach()
                (loss / micro).backward()
                step_loss[k] += float(loss.detach()) / micro
        for k, (trainer, opt) in enumerate(parts):
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainer.parameters(), cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[k].append(step_loss[k])
    classify = parts[-1][0].info.task == "classify"
    trainers = [t for t, _ in parts]
    with torch.no_grad():
        for trainer in trainers:
            trainer.eval()
        val_sampler = data.sampler("val", 0, cfg.train.batch_size)
        val = [val_sampler.next_indices(0, 1) for _ in range(cfg.train.eval_batches)]
        loss, acc = _evaluate(trainers, independent, data, "val", val)
        out = {"losses": losses, "val_loss": loss}
        if classify:
            out["val_acc"] = acc
        if data.info.test_size:
            loss, acc = _evaluate(trainers, independent, data, "test", _test_batches(cfg, data))
            out["test_loss"] = loss
            if classify:
                out["test_acc"] = acc
        if cfg.train.sample_tokens and not classify:
            out["sample"] = _sample(trainers, independent, cfg, data)
    return out


def _test_batches(cfg, data) -> list[torch.Tensor]:
    """The whole test split in order for a map-style data set; for a corpus (too many windows to
    visit) `train.eval_batches` batches drawn the way validation draws them."""
    if data.sampling == "epochs":
        return list(torch.arange(data.num_samples("test")).split(cfg.train.batch_size))
    sampler = data.sampler("test", 0, cfg.train.batch_size)
    return [sampler.next_indices(0, 1) for _ in range(cfg.train.eval_batches)]


def _evaluate(trainers, independent: bool, data, split: str, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(loss, accuracy) of the main path on `batches` of `split`. Validation (equal batches) is the
    mean of the per-batch means, as the trainers compute it; an unequal last batch (the test split
    walked in order) is weighted by its size, so the figures are per example."""
    loss_sum, correct, weight = 0.0, 0.0, 0.0
    equal = split == "val"
    for idx in batches:
        x, y = data.get_batch(split, idx)
        h = None if independent else x
        for trainer in trainers:
            h = trainer(x, z=h) if independent else trainer(h)
        w = 1.0 if equal else float(len(idx))
        loss_sum += w * float(cross_entropy(h.float(), y))
        if h.dim() == 2:  # classifier logits [B, C]; accuracy is meaningless for LM logits
            correct += w * float((h.argmax(-1) == y).float().mean())
        weight += w
    return loss_sum / weight, correct / weight


def _sample(trainers, independent: bool, cfg, data) -> str:
    """The pipeline's generation, with the stages chained in one process."""
    gen = torch.Generator().manual_seed(cfg.train.seed)
    ids = prompt_ids(cfg, data)
    start = len(ids)
    for _ in range(cfg.train.sample_tokens):
        window = ids[-cfg.model.block_size:].view(1, -1)
        h = None if independent else window
        for trainer in trainers:
            h = trainer(window, z=h) if independent else trainer(h)
        ids = torch.cat([ids, next_token(h, cfg.train.sample_temperature, gen)])
    return decode(ids[start:].tolist(), data.info.vocab_size)

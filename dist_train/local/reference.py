"""Local learning on one device: the stages of a local pipeline trained one after the other in a
single process. It is the arithmetic the multi-rank pipeline must reproduce step for step (the
tests prove it), and the cheap way to sweep seeds and learning rates for quality comparisons.
"""

from __future__ import annotations

from typing import Any

import torch

from dist_train.data import build_dataset
from dist_train.local.layout import stage_layout
from dist_train.optim import lr_at, optimizer_spec


def local_reference(cfg) -> dict[str, Any]:
    """The local pipeline's arithmetic with its stages trained one after the other in one process
    (synchronous mode): per-stage loss per step, then the main path's validation loss/accuracy
    over the same validation batches the trainers evaluate on."""
    from dist_train.train.local_loop import build_stage  # train -> local is the allowed direction at run time

    data = build_dataset(cfg.data, cfg.model.block_size)
    k_stages = cfg.parallel.stages
    parts = []
    for k in range(k_stages):
        layout = stage_layout(k, k_stages, k_stages)
        model, trainer, method, info = build_stage(cfg, data.info, layout)
        parts.append((layout, model, trainer, method, info, optimizer_spec(cfg.optim, trainer).build()))
    sampler = data.sampler("train", cfg.train.seed, cfg.train.batch_size)
    losses: list[list[float]] = [[] for _ in parts]
    for step in range(cfg.train.steps):
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        x, y = data.get_batch("train", sampler.next_indices(0, 1))
        for k, (layout, model, trainer, method, info, opt) in enumerate(parts):
            for group in opt.param_groups:
                group["lr"] = lr
            h = trainer.stage(x)
            if layout.last:
                loss = model.loss(h.float(), y)
            else:
                loss = method.local_loss(trainer.head, h, y, x.detach(), info)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainer.parameters(), cfg.train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[k].append(float(loss.detach()))
            x = h.detach()
    val_sampler = data.sampler("val", 0, cfg.train.batch_size)
    loss_sum, correct = 0.0, 0.0
    last_model = parts[-1][1]
    with torch.no_grad():
        for _, _, trainer, *_ in parts:
            trainer.eval()
        for _ in range(cfg.train.eval_batches):
            h, y = data.get_batch("val", val_sampler.next_indices(0, 1))
            for _, _, trainer, *_ in parts:
                h = trainer.stage(h)
            loss_sum += float(last_model.loss(h.float(), y))
            if last_model.task == "classify":
                correct += float((h.argmax(-1) == y).float().mean())
    out = {"losses": losses, "val_loss": loss_sum / cfg.train.eval_batches}
    if last_model.task == "classify":
        out["val_acc"] = correct / cfg.train.eval_batches
    return out

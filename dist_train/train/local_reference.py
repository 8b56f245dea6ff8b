"""Local learning on one device: the stages of a local pipeline trained one after the other in a
single process. It is the arithmetic the multi-rank pipeline must reproduce step for step (the
tests prove it), and the cheap way to sweep seeds and learning rates for quality comparisons.
"""

from __future__ import annotations

from typing import Any

import torch

from dist_train.data import build_dataset
from dist_train.local.channels import Channels, ChannelContext
from dist_train.local.inprocess_link import InProcessLinks
from dist_train.local.layout import stage_layout
from dist_train.models.loss import cross_entropy
from dist_train.optim import lr_at, optimizer_spec, set_lr
from dist_train.local.build import build_stage
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
    links = InProcessLinks(cfg.parallel.stages)
    stages = [_Stage(cfg, data, k, links[k]) for k in range(cfg.parallel.stages)]
    sampler = data.sampler("train", cfg.train.seed, cfg.train.batch_size)
    for step in range(cfg.train.steps):
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        links.on_every_stage(lambda k: stages[k].channels.before_step(step))
        # The pipeline streams the batch as micro-batches, accumulating gradients.
        for m, part in enumerate(sampler.next_indices(0, 1).chunk(cfg.train.grad_accum)):
            x, y = data.get_batch("train", part)
            for s in stages:
                s.forward_backward(x, y, step, (step << 20) + m)
        links.on_every_stage(lambda k: stages[k].channels.before_update())
        for s in stages:
            s.update(lr)
        links.on_every_stage(lambda k: stages[k].channels.after_step(step))
    links.on_every_stage(lambda k: stages[k].channels.finish())
    trainers = [s.trainer for s in stages]
    task = get_task(trainers[-1].info.task)
    with torch.no_grad():
        for trainer in trainers:
            trainer.eval()
        val_sampler = data.sampler("val", 0, cfg.train.batch_size)
        val = [val_sampler.next_indices(0, 1) for _ in range(cfg.train.eval_batches)]
        out = {"losses": [s.losses for s in stages], **_evaluate(trainers, task, data, "val", val)}
        if data.info.test_size:
            out.update(_evaluate(trainers, task, data, "test", _test_batches(cfg, data)))
        if cfg.train.sample_tokens and task.generates_text:
            out["sample"] = _sample(trainers, not trainers[0].receives_activations, cfg, data)
    return out


class _Stage:
    """Stage k of the pipeline in this process: its module, optimizer, RNG stream and real channels,
    joined to the other stages by an in-process link."""

    def __init__(self, cfg, data, k: int, link):
        layout = stage_layout(k, cfg.parallel.stages, cfg.parallel.stages)
        self.cfg, self.link = cfg, link
        self.trainer, info = build_stage(cfg, data.info, layout)
        self.opt = optimizer_spec(cfg.optim, self.trainer, num_outputs=info.num_classes).build()
        # Each pipeline stage draws its randomness (negatives, noise, dropout) from its own stream.
        self.stream = torch.Generator().manual_seed(cfg.train.seed + 1000 * k)
        self.receives = not layout.first and self.trainer.receives_activations
        self.sends = not layout.last and self.trainer.receives_activations
        self.channels = Channels(self.trainer.channels(ChannelContext(cfg, layout, link, torch.device("cpu"), 0,
                                                                      _no_replay)))
        self.losses: list[float] = []
        self._step_loss = 0.0

    def forward_backward(self, x, y, step: int, msg: int) -> None:
        """One micro-batch: receive, forward (the message goes on), local loss, backward."""
        received, reads = None, self.trainer.reads_data
        if self.receives:
            self.channels.before_receive()
            received, sent_y = self.link.recv(msg)
            y = sent_y if sent_y is not None else y
            self.channels.on_received(x if reads else None, received, y, step)
        send = (lambda h: self.link.send(h, y, msg)) if self.sends else None  # noqa: E731
        torch.set_rng_state(self.stream.get_state())
        loss = self.trainer(x=x if reads else None, received=received, y=y, on_activation=send)
        self.stream.set_state(torch.get_rng_state())
        micro = self.cfg.train.grad_accum
        (loss / micro).backward()
        self._step_loss += float(loss.detach()) / micro

    def update(self, lr: float) -> None:
        """The stage's optimizer step (gradients clipped as the trainers clip them)."""
        set_lr(self.opt, lr)
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainer.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(self._step_loss)
        self._step_loss = 0.0


def _no_replay(x, received, y) -> None:
    raise RuntimeError("the reference runs the synchronous schedule: no stage replays a batch")


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
    return decode(ids[start:].tolist(), data)

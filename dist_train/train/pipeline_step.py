"""One training step of one pipeline stage: the micro-batches in, forward, local loss, backward, the
message out, then the stage's own update. The channels' hooks fire at their fixed points; the
session's window collects the loss and the busy time (what is not busy is waiting for the stage
before).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from dist_train.local.channels import ChannelContext, build_channels
from dist_train.local.evaluate import replica_mean
from dist_train.telemetry import peak_memory_bytes
from dist_train.train.batches import StepBatch


def reads_data(cfg, stage) -> bool:
    """Does this stage read the training data? The stages that need x, and every stage when the
    targets stay off the wire (or nothing is received)."""
    return stage.reads_data or not cfg.local.send_targets or not stage.receives_activations


class PipelineStep:
    def __init__(self, session, stage, layout, data, link):
        """`session` has resumed (its backend, transform and votes are this stage's); `stage` the
        StageModule, `layout` its place, `link` to its neighbours."""
        cfg = session.cfg
        self.cfg, self.stage, self.layout, self.data, self.link = cfg, stage, layout, data, link
        self.backend, self.transform, self.control = session.backend, session.transform, session.control
        self.window, self.device = session.window, session.ctx.device
        self.reads_data = reads_data(cfg, stage)
        self.receives = not layout.first and stage.receives_activations
        self.sends = not layout.last and stage.receives_activations
        # The link's buffers have one shape per tag: micro-batches of varying size (DP-SGD's Poisson
        # batches) travel padded to the transform's physical size, and every stage slices its own count
        # back (all stages draw the same indices, so the count never needs to cross).
        self.pad_to = self.transform.physical_size
        self.channels = build_channels(stage, ChannelContext(cfg, layout, link, self.device, session.start,
                                                             self.train_on))

    def run(self, step: int, batch: StepBatch, last_step: bool) -> None:
        """Step `step` on the micro-batches of `batch`; `last_step`: the run's last (nothing to prefetch)."""
        self.channels.before_step(step)
        inputs = batch.inputs if batch.inputs is not None else [None] * len(batch.parts)
        parts = [(part, xy) for part, xy in zip(batch.parts, inputs) if part.numel()]
        step_loss = torch.zeros((), device=self.device)
        for m, (part, xy) in enumerate(parts):
            msg = (step << 20) + m
            # Post the next receive early unless this is the last message (a varying count only
            # looks ahead within the step).
            ahead = m + 1 < len(parts) or (self.pad_to is None and step + 1 < self.cfg.train.steps and not last_step)
            x, received, y = self._inputs(step, msg, part, xy, ahead)
            with self.window.working():
                step_loss += self.forward_backward(x, received, y, msg, m == len(parts) - 1, step) / len(parts)
        with self.window.working():
            self.channels.before_update()
            self.backend.step(self.transform, accept=self.control.accept(step))  # never a non-finite update
        self.window.add(step_loss, self.control.applied)  # a dropped step's loss stays out of the mean
        self.channels.after_step(step)

    def _inputs(self, step: int, msg: int, part: torch.Tensor, xy, ahead: bool) -> tuple:
        """(x for the stage or None, what the previous stage sent or None, the targets); `xy`: the
        micro-batch `part` as read from the data (None on a stage that reads no data)."""
        x = received = y = None
        if self.reads_data:
            x, y = xy
        if self.receives:
            self.channels.before_receive()
            received, sent_y = self.link.recv(msg, prefetch=ahead)
            if self.pad_to is not None:  # padded on the wire: this micro-batch's own rows
                received = received[:part.numel()]
                sent_y = sent_y[:part.numel()] if sent_y is not None else None
            y = sent_y if sent_y is not None else y
            self.channels.on_received(x if self.stage.reads_data else None, received, y, step)
        return (x if self.stage.reads_data else None), received, y

    def forward_backward(self, x, received, y, msg: Optional[int], is_last: bool,
                         step: Optional[int] = None) -> torch.Tensor:
        """Forward, (send on), local loss, backward of one micro-batch; gradients accumulate. The
        loss comes back detached on the device (read at log time, not here: no sync per micro-batch).
        `step` None: an extra update of this rank's own (a replay), outside the votes."""
        send = self._send_on(y, msg) if msg is not None and self.sends else None
        with self.backend.sync_context(is_last), self.backend.autocast():
            loss = self.backend.model(x=x, received=received, y=y, on_activation=send)
            if step is not None:
                loss = self.control.poison(loss, step)
        rows = (y if y is not None else received).size(0)
        self.transform.backward(self.backend, loss, rows, is_last)  # default: 1/grad_accum, the step sees the batch mean
        if step is not None and rows:  # an empty micro-batch (DP-SGD's Poisson draw) has no loss to judge
            self.control.observe(loss)
        return loss.detach()

    def _send_on(self, y, msg: int):
        """The stage's `on_activation`: the message goes on before the stage's own loss, so the
        next stage starts at once."""
        return lambda h: self.link.send(_pad(h, self.pad_to), _pad(y, self.pad_to), msg)

    def train_on(self, x, received, y) -> None:
        """One whole extra update (asynchronous mode's replay): no vote, but never a non-finite update."""
        self.forward_backward(x, received, y, None, True)
        self.backend.step(accept=math.isfinite)

    def record(self, done: int, lr: float) -> dict:
        """This stage's figures for the window ending at step `done`: the loss is the mean over the
        window's applied steps and the stage's replicas (which drop the same steps), None when every
        step was dropped; `idle_fraction` is the share of the window's wall time spent waiting (for the
        stage before, and for data: `data_wait_frac` is the latter's share alone)."""
        w, link = self.window, self.link
        elapsed, loss = w.elapsed(), w.mean_loss()
        return {"step": done, "loss": None if loss is None else replica_mean(self.backend, loss), "lr": lr,
                "samples_per_s": w.steps * self.cfg.train.batch_size / elapsed,
                "idle_fraction": max(0.0, 1.0 - w.busy / elapsed), **w.data_figures(elapsed / w.steps),
                "bytes_sent": link.bytes_sent, "tensors_sent": link.tensors_sent,
                "sent_requires_grad": link.sent_requires_grad,
                "peak_mem_bytes": peak_memory_bytes(self.device), "stage": self.layout.stage,
                **self.channels.metrics()}


def _pad(t: torch.Tensor, rows) -> torch.Tensor:
    """`t` with zero rows appended up to `rows` (None: as it is)."""
    if rows is None or t.size(0) == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.size(0), *t.shape[1:]))])

"""Channels: traffic and work beside the forward stream, as hooks the stage loop calls.

The stage loop streams micro-batches forward and nothing else. Anything more is a `Channel`:
MAN's weights sent backward (owned by the MAN stage module), the replay buffer of asynchronous
mode (owned by the runtime). The loop holds a stage's channels as one `Channels` and calls its hooks
at fixed points, knowing none by name; a channel's state goes into the stage's checkpoint under the
channel's `name`. A channel talks to other stages only through `ctx.link`: a `StageLink` between
ranks, or an in-process link when the single-process reference runs the same channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from dist_train.local.replay import ReplayBuffer


@dataclass
class ChannelContext:
    """What a channel may use: the run's config, this rank's place, the link to its neighbours, and
    `train_on(x, received, y)`, one whole extra local update (forward, backward, optimizer step) on a
    micro-batch: `x` the raw input (None unless the stage reads data), `received` what came in."""

    cfg: Any
    layout: Any
    link: Any
    device: torch.device
    start: int  # the first step this run trains (after a resume)
    train_on: Callable[[Optional[torch.Tensor], torch.Tensor, torch.Tensor], None]


class Channel:
    name = "channel"

    def before_receive(self) -> None:
        """The stage is about to wait for the next micro-batch (asynchronous mode fills the wait)."""

    def on_received(self, x: Optional[torch.Tensor], received: torch.Tensor, y: torch.Tensor, step: int) -> None:
        """A micro-batch arrived from the previous stage (`x`: the raw input, if the stage reads it)."""

    def before_step(self, step: int) -> None:
        """A new step begins (before its first micro-batch)."""

    def before_update(self) -> None:
        """Gradients of the step are complete (after backward and the replicas' reduction), the
        optimizer step (clip, update) comes next."""

    def after_step(self, step: int) -> None:
        """This stage has taken its optimizer step for `step`."""

    def finish(self) -> None:
        """Training is over: complete outstanding traffic (every message sent is received)."""

    def metrics(self) -> dict:
        """Figures for this stage's log record."""
        return {}

    def state_dict(self) -> Optional[dict]:
        """Checkpointed state, or None when the channel has none."""
        return None

    def load_state_dict(self, state: dict) -> None:
        pass


class ReplayChannel(Channel):
    """Asynchronous mode (after DGL's asynchronous variant): while the next activation has not
    arrived, train on a replayed batch (least-used, then freshest; capped reuse) instead of idling."""

    name = "replay"

    def __init__(self, ctx: ChannelContext):
        self.ctx = ctx
        self.buffer = ReplayBuffer(ctx.cfg.local.replay_size, ctx.cfg.local.max_reuse)

    def before_receive(self) -> None:
        while not self.ctx.link.ready() and (old := self.buffer.sample()) is not None:
            received, y, _, x = old
            self.ctx.train_on(x, received, y)

    def on_received(self, x, received, y, step) -> None:
        self.buffer.add(received, y, step, inp=x)  # a stage that reads data (InfoPro) replays its input too

    def metrics(self) -> dict:
        b = self.buffer
        return {"replays": b.replays, "max_reuse_seen": b.max_uses,
                "mean_staleness": b.staleness_sum / b.replays if b.replays else 0.0}

    def state_dict(self) -> dict:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state, self.ctx.device)


class Channels(list):
    """A stage's channels as one: each hook runs every channel's, in order; `metrics` merges theirs."""

    def before_receive(self) -> None:
        for ch in self:
            ch.before_receive()

    def on_received(self, x: Optional[torch.Tensor], received: torch.Tensor, y: torch.Tensor, step: int) -> None:
        for ch in self:
            ch.on_received(x, received, y, step)

    def before_step(self, step: int) -> None:
        for ch in self:
            ch.before_step(step)

    def before_update(self) -> None:
        for ch in self:
            ch.before_update()

    def after_step(self, step: int) -> None:
        for ch in self:
            ch.after_step(step)

    def finish(self) -> None:
        for ch in self:
            ch.finish()

    def metrics(self) -> dict:
        out: dict = {}
        for ch in self:
            out.update(ch.metrics())
        return out


def build_channels(stage, ctx: ChannelContext) -> Channels:
    """The stage's own channels, then the runtime's (replay in asynchronous mode, on stages that
    wait for a previous one)."""
    channels = Channels(stage.channels(ctx))
    if ctx.cfg.local.asynchronous and not ctx.layout.first and stage.receives_activations:
        channels.append(ReplayChannel(ctx))
    return channels

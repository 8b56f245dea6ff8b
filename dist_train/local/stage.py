"""The StageModule protocol: one rank's part of a local-learning pipeline, as the stage loop sees it.

The loop (`dist_train.train.local_loop`) knows no method by name. It drives one `StageModule`:

  training   `stage(x=..., received=..., y=y, on_activation=send)` -> the local loss (a scalar).
             `x` is the raw batch when the stage reads data (stage 0, and every stage of a method whose
             stages read the input themselves: NoProp, InfoPro's reconstruction of x); `received` is
             what the previous stage sent. The stage calls `on_activation(message)` as soon as the
             message for the next stage exists, before its own loss and backward, so the next stage
             can start at once. Only the detached message crosses; no gradient ever does.
  inference  `stage(x=..., received=...)` -> what goes on to the next stage, or, on the last stage,
             the logits the task metrics read (class / next-token scores; Forward-Forward: goodness).
             It runs through the wrapped module's forward, so FSDP2/DeepSpeed hooks fire.
  channels   `stage.channels(ctx)` -> extra traffic the method owns (MAN's weights sent backward), as
             `dist_train.local.channels.Channel` hooks; the runtime adds its own (the replay buffer of
             asynchronous mode) the same way.

A method is one file that builds its StageModule (`LocalMethod.build_stage`) plus one registry line in
`dist_train.local.methods`. Methods with an auxiliary head and a local loss (DGL, Mono-Forward,
InfoPro, AugLocal, tpSGD) need no StageModule of their own: `HeadStage` below runs them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from dist_train.local.stage_info import StageInfo
from dist_train.local.split import Stage
from dist_train.models.loss import cross_entropy

OnActivation = Optional[Callable[[torch.Tensor], None]]


class StageModule(nn.Module):
    """Base of every stage module. Subclasses set `reads_data` and implement `forward`."""

    # Does this stage read the raw batch x (from the deterministic sampler) besides what it receives?
    reads_data: bool = False
    # Does this stage train on what the previous stage sent? False: zero training traffic (NoProp).
    receives_activations: bool = True

    def __init__(self, info: StageInfo):
        super().__init__()
        self.info = info

    @property
    def first(self) -> bool:
        return self.info.index == 0

    @property
    def last(self) -> bool:
        return self.info.index == self.info.num_stages - 1

    def fsdp_units(self) -> list[nn.Module]:
        """Sub-modules FSDP2 shards one by one (the stage's blocks)."""
        return list(self.blocks)  # type: ignore[attr-defined]

    def channels(self, ctx) -> list:
        """Extra channels this stage owns (see `dist_train.local.channels`); none by default."""
        return []


class HeadStage(StageModule):
    """The common form: blocks f_k, and (except on the last stage) an auxiliary head g_k trained with
    them on the method's local loss L_k = method.local_loss(g_k, h_k, y, x). The last stage trains on
    the task loss. Only h_k.detach() goes on."""

    def __init__(self, model: nn.Module, blocks: range, method, info: StageInfo):
        super().__init__(info)
        self.stage = Stage(model, blocks, first=self.first, last=self.last)
        self.head = None if self.last else method.build_head(info)
        self.method = method
        # A method that reconstructs the model input (InfoPro) needs x on every stage: read from the
        # sampler like the targets, never sent.
        self.reads_data = self.first or (not self.last and method.needs_input)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.stage.blocks

    def forward(self, x: Optional[torch.Tensor] = None, received: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None, on_activation: OnActivation = None):
        h = self.stage(x if self.first else received)
        if y is None:
            return h
        if on_activation is not None:
            on_activation(h.detach())
        if self.head is None:  # the last stage: its output is the logits, its loss the task loss
            return cross_entropy(h.float(), y)
        return self.method.local_loss(self.head, h, y, None if x is None else x.detach(), self.info)

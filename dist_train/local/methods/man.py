"""MAN: Momentum Auxiliary Network (Su et al., ECCV 2024).

A greedy stage is short-sighted: its head knows nothing of what the next stage will do with its
features. MAN's head starts with an exponential moving average (m = 0.995) of the *next stage's
first block*, followed by a learnable copy of that block and the small classifier. The EMA needs
the next stage's weights, so MAN is the one method where something travels backward between
ranks — weights, never gradients, and only every `local.man_every` steps, asynchronously (the
runtime's weight channel in `dist_train.local.link`). Between updates the EMA copy is frozen.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from dist_train.errors import UserError
from dist_train.local.method import LocalMethod, StageInfo
from dist_train.local.methods._common import small_classifier
from dist_train.models.loss import cross_entropy


class MANHead(nn.Module):
    def __init__(self, next_block: nn.Module, out: nn.Module):
        super().__init__()
        self.ema = copy.deepcopy(next_block)
        for p in self.ema.parameters():
            p.requires_grad_(False)  # moved only by the EMA update, never by the optimizer
        self.learnable = copy.deepcopy(next_block)
        self.out = out

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.learnable(self.ema(h)))


class MAN(LocalMethod):
    name = "man"
    sends_weights_back = True

    def __init__(self, momentum: float = 0.995):
        self.momentum = momentum

    def build_head(self, info: StageInfo) -> nn.Module:
        if not info.later_blocks:
            raise UserError("local.method: man needs a block after every non-last stage")
        return MANHead(info.later_blocks[0], small_classifier(info))

    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   stage_input: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        return cross_entropy(head(h), targets)

    @torch.no_grad()
    def update_ema(self, head: MANHead, flat_weights: torch.Tensor) -> None:
        """ema <- m * ema + (1 - m) * (the next stage's first block, as just received)."""
        params = list(head.ema.parameters())
        received = torch.split(flat_weights, [p.numel() for p in params])
        for p, w in zip(params, received):
            p.mul_(self.momentum).add_(w.view_as(p).to(p.dtype), alpha=1 - self.momentum)


def flat_block_weights(block: nn.Module) -> torch.Tensor:
    """What the next stage sends back: its first block's parameters, flattened (detached)."""
    return torch.cat([p.detach().reshape(-1).float() for p in block.parameters()])

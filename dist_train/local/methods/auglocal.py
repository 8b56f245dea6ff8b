"""AugLocal: auxiliary networks made of fresh copies of the layers that follow.

Ma, Wu, Si, Tan, "Scaling Supervised Local Learning with Augmented Auxiliary Networks", ICLR 2024,
arXiv 2402.17318.

WHY: a local stage is short-sighted because its head looks nothing like the network that will
actually consume its output. AugLocal builds the head of layer l from d_l layers sampled uniformly
from the layers after l -- their *architecture*, not their weights (no weights or gradients
travel between stages) -- followed by the model's own kind of output head, so the stage learns
features that a network shaped like its real successor can use.

Choices (documented, tunable through the constructor):
  * Depth ("pyramidal": shrinks linearly with depth, as in the paper, to bound the head's cost):
        d_k = max(1, min(n, round(n * (1 - k/K) * ratio)))   with n = len(later_blocks),
    ratio = 0.5 by default (round half up). Both n and (1 - k/K) fall with k, so d_k never grows.
  * Sampling: evenly spaced positions among the later blocks, always ending at the last one, i.e.
    block round((i+1) * n / d) - 1 for i < d. Deterministic (every rank and restart builds the same
    head) and it spans the whole remaining depth, which is what "uniformly" means in the paper.
  * Copies: `copy.deepcopy` of the block (so they never share tensors with the model), then every
    submodule with `reset_parameters` is re-initialised, so only the architecture is borrowed.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn

from dist_train.errors import UserError
from dist_train.local.method import LocalMethod, StageInfo
from dist_train.local.methods._common import check_info, output_head
from dist_train.models.loss import cross_entropy


def head_depth(num_later: int, index: int, num_stages: int, ratio: float) -> int:
    """d_k, the number of sampled later blocks in stage `index`'s head."""
    if num_later < 1:
        return 0
    d = math.floor(num_later * (1.0 - index / num_stages) * ratio + 0.5)
    return max(1, min(num_later, d))


def sample_indices(num_later: int, depth: int) -> list[int]:
    """`depth` evenly spaced indices into range(num_later), ending at the last one."""
    return [max(0, math.floor((i + 1) * num_later / depth + 0.5) - 1) for i in range(depth)]


def fresh_copy(module: nn.Module) -> nn.Module:
    """Same architecture, new tensors, new random init."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    for p in clone.parameters():
        # deepcopy also copies .grad and a frozen flag; the head starts clean and trainable.
        p.grad = None
        p.requires_grad_(True)
    clone.train()
    return clone


class AugLocalHead(nn.Module):
    def __init__(self, blocks: list[nn.Module], out: nn.Module, sampled: list[int]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.out = out
        self.sampled = tuple(sampled)  # which later blocks were copied (for logs and tests)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class AugLocal(LocalMethod):
    name = "auglocal"

    def __init__(self, ratio: float = 0.5, min_depth: int = 1):
        if ratio <= 0:
            raise UserError(f"local.method: auglocal depth ratio must be > 0, got {ratio}")
        self.ratio = ratio

    def build_head(self, info: StageInfo) -> nn.Module:
        check_info(info)
        later = list(info.later_blocks)
        if not later:
            raise UserError(f"local.method: auglocal stage {info.index} has no later blocks to copy "
                            f"(only non-last stages get a head)")
        depth = head_depth(len(later), info.index, info.num_stages, self.ratio)
        idx = sample_indices(len(later), depth)
        return AugLocalHead([fresh_copy(later[i]) for i in idx], output_head(info), idx)

    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   x: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        return cross_entropy(head(h), targets)

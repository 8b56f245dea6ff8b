"""Mono-Forward.

Gong, Li, Abdulla, "Mono-Forward: Backpropagation-Free Algorithm for Efficient Neural Network
Training Harnessing Local Errors", arXiv 2501.09238.

Each layer i owns one projection matrix M_i (classes x width). Its "goodness" for every class is
G_i = a_i M_i^T, and the layer minimises cross-entropy of softmax(G_i) against the label. The head
is therefore a single bias-free linear map with no hidden layer: the cheapest head of all the
methods (a ~ W*C multiply-adds per example), which is where the paper's energy/time savings come
from, and it forces the stage's own features to be linearly separable.

The CNN's maps are averaged over space first (the paper is on MLPs; pooling keeps M at W x C
instead of W*H*W' x C, and matches how the model's own head reads the CNN). The GPT applies M to
every position with the next token as label.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dist_train.local.method import LocalMethod, StageInfo
from dist_train.local.methods._common import check_info, features
from dist_train.models.loss import cross_entropy


class MonoForwardHead(nn.Module):
    """h -> goodness G = features(h) M^T, one score per class."""

    def __init__(self, info: StageInfo):
        super().__init__()
        self.model_name = info.model_name
        # No bias: the paper's goodness is exactly a_i M_i^T.
        self.M = nn.Linear(info.width, info.num_classes, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.M(features(h, self.model_name))


class MonoForward(LocalMethod):
    name = "mono_forward"

    def build_head(self, info: StageInfo) -> nn.Module:
        check_info(info)
        return MonoForwardHead(info)

    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   x: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        # Cross-entropy over the goodness scores, as in the paper.
        return cross_entropy(head(h), targets)

"""Greedy / Decoupled Greedy Learning (DGL).

Belilovsky, Eickenberg, Oyallon, "Decoupled Greedy Learning of CNNs", ICML 2020, arXiv 1901.08164.

Each stage trains its blocks and a small auxiliary classifier on the task loss itself; nothing but
(h.detach(), y) goes to the next stage. The head is kept small on purpose: its compute is the
overhead `a` in the local pipeline's K/(1+a) speedup, and DGL showed a shallow head already makes
greedily trained stages close to end-to-end training on CNNs.

The asynchronous DGL variant's replay buffer (to absorb uneven stage speeds) is a scheduling
matter for the runtime, not part of the head or the loss, so it does not live here.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dist_train.local.method import LocalMethod, StageInfo
from dist_train.local.methods._common import small_classifier
from dist_train.models.loss import cross_entropy


class DGL(LocalMethod):
    name = "dgl"
    per_example_losses = True  # a stage's loss is a sum over examples: DP-SGD can clip each

    def build_head(self, info: StageInfo) -> nn.Module:
        # GPT: LayerNorm + Linear(W, vocab); MLP: Linear+ReLU+Linear; CNN: conv3x3+ReLU+pool+Linear.
        return small_classifier(info)

    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   x: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        # The same mean cross-entropy as the model's task loss, so local and final losses compare.
        return cross_entropy(head(h), targets)

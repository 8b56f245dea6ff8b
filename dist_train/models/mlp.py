"""A plain multi-layer perceptron classifier, laid out as embed -> blocks -> head."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dist_train.models.base import EmbedBlocksHead
from dist_train.models.spec import ModelSpec, StackOptions


class MLPBlock(nn.Module):
    """Linear + ReLU + dropout at constant width, so any block boundary is a valid stage cut."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.fc(x)))


class MLP(EmbedBlocksHead):
    """forward(x [B,*input_shape] float) -> logits [B,num_classes].

    `n_layer` hidden blocks follow the input projection, so `len(blocks) == n_layer` for every
    reference model and stage splitting can treat them alike.
    """

    task = "classify"

    def __init__(self, in_features: int, num_classes: int, n_layer: int, width: int, dropout: float = 0.0):
        super().__init__()
        self.width = width
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU())
        self.blocks = nn.ModuleList(MLPBlock(width, dropout) for _ in range(n_layer))
        self.head = nn.Linear(width, num_classes)


class MLPSpec(ModelSpec):
    """`model.name: mlp`: the MLP classifier above, on any image (flattened)."""

    task = "classify"
    options = StackOptions

    @classmethod
    def build(cls, opts, info, block_size):
        return MLP(math.prod(info.input_shape), info.num_classes, opts.n_layer, opts.width, opts.dropout)

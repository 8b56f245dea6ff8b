"""A small CNN for tiny images, laid out as embed -> blocks -> head: 1-channel 8x8 digits and
3-channel 32x32 shapes32.

An image larger than 16 px is brought down by 4 in the embedding (a stride-2 3x3 conv, then 2x2
max-pooling), so the blocks of 32x32 shapes run at 8x8, and a block there costs what it
costs on 8x8 digits (each 3x3 convolution then spans 12 of the 32 pixels). Images of 16 px or
less (digits) keep the stride-1 stem at full resolution, exactly as before.

No BatchNorm: its running statistics are cross-sample state that breaks per-sample gradients and
makes data-parallel results depend on the per-rank batch split. GroupNorm normalizes each sample
on its own, so it has neither problem.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dist_train.errors import UserError
from dist_train.models.base import EmbedBlocksHead
from dist_train.models.spec import ModelSpec, StackOptions


class ConvBlock(nn.Module):
    """3x3 conv (padding keeps H,W) + GroupNorm + ReLU + dropout, at constant channel count."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(width, width, kernel_size=3, padding=1)
        # gcd keeps the group count a divisor of any width the user picks.
        self.norm = nn.GroupNorm(math.gcd(8, width), width)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.norm(self.conv(x))))


class CNN(EmbedBlocksHead):
    """forward(x [B,in_channels,H,W] float) -> logits [B,num_classes]."""

    task = "classify"

    def __init__(self, in_channels: int, image_size: int, num_classes: int, n_layer: int,
                 width: int, dropout: float = 0.0):
        super().__init__()
        # Blocks keep the spatial size and the head pools globally, so any image size works;
        # image_size only chooses the stem.
        self.image_size = image_size
        self.width = width
        if image_size > 16:
            self.embed = nn.Sequential(nn.Conv2d(in_channels, width, kernel_size=3, stride=2, padding=1), nn.ReLU(),
                                       nn.MaxPool2d(2))
        else:
            self.embed = nn.Sequential(nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList(ConvBlock(width, dropout) for _ in range(n_layer))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class CNNSpec(ModelSpec):
    """`model.name: cnn`: the small CNN classifier above, on [C,H,W] images."""

    task = "classify"
    options = StackOptions

    @classmethod
    def build(cls, opts, info, block_size):
        if len(info.input_shape) != 3:
            raise UserError(f"model.name: cnn needs [C,H,W] inputs, got shape {tuple(info.input_shape)}")
        channels, height, _ = info.input_shape
        return CNN(channels, height, info.num_classes, opts.n_layer, opts.width, opts.dropout)

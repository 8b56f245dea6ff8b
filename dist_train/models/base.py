"""The shape every reference model shares: `embed` -> `blocks` -> `head`.

Keeping it in one place is what lets the pipeline split any of them (stage 0 owns `embed`, the last
stage owns `head`) and FSDP shard them per block, without knowing which model it is.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dist_train.models.loss import cross_entropy


class EmbedBlocksHead(nn.Module):
    embed: nn.Module
    blocks: nn.ModuleList
    head: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy: logits [B,C] vs labels [B], or [B,T,V] vs next tokens [B,T]."""
        return cross_entropy(outputs, targets)

"""The interface every local-learning method implements.

A stage k < K-1 trains f_k (its blocks) together with an auxiliary head g_k on a local loss
L_k = method.local_loss(g_k, h_k, targets, stage_input). The last stage trains on the task loss.
Only (h_k.detach(), targets) travel to the next stage; no gradient crosses a stage boundary.

Shapes: for the GPT, h is [B, T, width] and targets [B, T] (next-byte ids); for the MLP, h is
[B, width]; for the CNN, h is [B, width, H, W]; classifier targets are [B].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class StageInfo:
    index: int  # 0-based stage number
    num_stages: int
    task: str  # "lm" or "classify"
    width: int  # feature size of h (channels for the CNN)
    num_classes: int  # vocab size for "lm", classes for "classify"
    later_blocks: tuple  # the model's blocks after this stage (architecture reference, e.g. AugLocal)
    model_name: str  # "gpt", "mlp" or "cnn"


class LocalMethod(ABC):
    name: str = "base"
    # True when stages need no activations from the previous stage at all (NoProp).
    independent_stages: bool = False
    # True when a stage needs its successor's weights (MAN): the one opt-in backward channel.
    sends_weights_back: bool = False

    @abstractmethod
    def build_head(self, info: StageInfo) -> nn.Module:
        """Auxiliary head for a non-last stage (its parameters are trained with the stage)."""

    @abstractmethod
    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   stage_input: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        """Scalar local loss of a non-last stage. `stage_input` is what the stage received (detached)."""

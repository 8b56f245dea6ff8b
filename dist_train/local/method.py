"""The interface every local-learning method implements.

A method builds the StageModule of each stage (`build_stage`, see `dist_train.local.stage`). Most
methods keep the common form and only supply an auxiliary head and a local loss: a stage k < K-1
trains f_k (its blocks) together with g_k on L_k = method.local_loss(g_k, h_k, targets, x), the last
stage on the task loss, and only h_k.detach() travels on; no gradient crosses a stage boundary.
Methods that need more (Forward-Forward's positive and negative streams, MAN's weights sent back,
NoProp's denoising steps) override `build_stage`. Hyperparameters come from `local.<method>.*`
(the constructor's keyword arguments).

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
    task: str  # a key of dist_train.tasks.TASKS
    width: int  # feature size of h (channels for the CNN)
    num_classes: int  # vocab size for "lm", classes for "classify"
    later_blocks: tuple  # the model's blocks after this stage (architecture reference, e.g. AugLocal)
    model_name: str  # "gpt", "mlp" or "cnn"
    input_shape: tuple = ()  # one example of the model input x, e.g. (1, 8, 8); () for token ids
    cut_points: tuple = ()  # the block index where each stage after the first begins (all stages)
    image_norm: Optional[tuple] = None  # DataInfo.image_norm: (mean, std) per channel back to [0, 1] pixels


class LocalMethod(ABC):
    name: str = "base"
    # True when the local loss needs the model input x on every stage (InfoPro reconstructs it):
    # non-first stages then read x from the deterministic sampler, as they read targets.
    needs_input: bool = False

    def build_stage(self, model: nn.Module, blocks: range, info: StageInfo) -> nn.Module:
        """The StageModule for the model's `blocks` as stage `info.index`: by default the common
        form, the blocks plus this method's auxiliary head (`HeadStage`)."""
        from dist_train.local.stage import HeadStage  # stage.py builds on this interface

        return HeadStage(model, blocks, self, info)

    @abstractmethod
    def build_head(self, info: StageInfo) -> nn.Module:
        """Auxiliary head for a non-last stage (its parameters are trained with the stage)."""

    @abstractmethod
    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   x: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        """Scalar local loss of a non-last stage. `x` is the model input (detached) when the method
        `needs_input`, else None."""

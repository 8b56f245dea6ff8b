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
from typing import ClassVar, Optional

import torch
from torch import nn

from dist_train.config.options import Options
from dist_train.local.stage import HeadStage
from dist_train.local.stage_info import StageInfo

__all__ = ["LocalMethod", "StageInfo"]


class LocalMethod(ABC):
    """A local-learning method. Besides building its stages it owns its configuration: its options
    model (`local.<name>.*`, passed to the constructor as keyword arguments), the rules a run must
    satisfy to use it (`check`) and the words `dist-train plan` shows for its stages (`plan_stages`).
    Registered by name in `dist_train.registry.LOCAL_METHODS`."""

    name: str = "base"
    options: ClassVar[Optional[type[Options]]] = None  # local.<name>.*; None: the method has none
    # True when the local loss needs the model input x on every stage (InfoPro reconstructs it):
    # non-first stages then read x from the deterministic sampler, as they read targets.
    needs_input: bool = False
    # True when each example's local loss depends on that example alone (DGL's auxiliary classifier):
    # DP-SGD can then clip per example inside each stage.
    per_example_losses: ClassVar[bool] = False

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        """Raise UserError naming the key when a run of `cfg` on `world_size` ranks cannot use this
        method (called for pipelines, parallel.stages > 1)."""

    @classmethod
    def plan_stages(cls, cfg, ranges: list[range]) -> tuple[list[str], str]:
        """What `dist-train plan` shows: each stage's parts (one string per stage, over the model's
        block `ranges`) and the pipeline's traffic in words."""
        last = len(ranges) - 1
        parts = [("embed + " if i == 0 else "") + f"blocks {r.start}-{r.stop - 1}" +
                 (" + head" if i == last else " + aux head") for i, r in enumerate(ranges)]
        return parts, "activations forward" + ("" if cfg.local.send_targets else " (targets read locally)")

    def build_stage(self, model: nn.Module, blocks: range, info: StageInfo) -> nn.Module:
        """The StageModule for the model's `blocks` as stage `info.index`: by default the common
        form, the blocks plus this method's auxiliary head (`HeadStage`)."""
        return HeadStage(model, blocks, self, info)

    @abstractmethod
    def build_head(self, info: StageInfo) -> nn.Module:
        """Auxiliary head for a non-last stage (its parameters are trained with the stage)."""

    @abstractmethod
    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   x: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        """Scalar local loss of a non-last stage. `x` is the model input (detached) when the method
        `needs_input`, else None."""

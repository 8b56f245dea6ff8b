"""tpSGD: each stage's own output regresses onto a fixed random projection of the label.

Lomnitz, Daniels, Zhang, Piacentino, "Learning with Local Gradients at the Edge" (tpSGD, target
projection stochastic gradient descent), arXiv 2208.08503.

WHY: instead of learning an auxiliary classifier, layer i gets a *target* made by a fixed random
projection P_i of the one-hot label y*, and its output y_i is trained towards it with a local
loss, here the paper's ℓ2 one:

    J_i = ‖ P_i y* − y_i ‖²₂ .                                                               (1)

There is no trainable readout: the layer's own output is what is compared with the target, so the
head has no parameters and the stage trains on forward information only. A random projection keeps
different classes' targets apart, so matching them makes the features class-discriminative.

Here: P_i is a [C, W] buffer and P_i y* = P_i[y] (a row lookup, never a one-hot matmul, which would
cost C·W per example for the GPT's vocabulary), W = the stage output's feature width:
  * MLP: y_i = h [B, W].
  * CNN (adaptation): y_i = h averaged over space [B, W] (the label has no spatial layout; the
    reference CNN's own head pools the same way).
  * GPT (adaptation): y_i = h at every position [B, T, W], label = the next byte at that position.
Named simplifications: J is the mean squared error over batch and features (‖·‖² divided by B·W, a
constant factor the learning rate absorbs); a stage of several blocks plays the paper's layer (its
last block's output is y_i, the blocks inside train through the stage's autograd). P_i's entries are
N(0, 1) (our choice: every target entry has unit variance, so J starts O(1) whatever C).

P_i is a non-trainable persistent buffer (moves with .to(), saved in checkpoints, never in the
optimizer), generated on the CPU from a generator seeded with BASE_SEED + stage index: the same
stage gets the same P_i on every rank, restart and device, and different stages get different
projections, as in the paper (one P_i per layer).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pydantic import Field

from dist_train.config.options import Options
from dist_train.errors import UserError
from dist_train.local.method import LocalMethod, StageInfo
from dist_train.local.methods._common import check_info, features

BASE_SEED = 0x7D5  # any fixed constant; only "same stage -> same P" matters


def projection(num_classes: int, dim: int, stage_index: int) -> torch.Tensor:
    """P_i as a [C, W] table (row c is P_i·onehot(c))."""
    g = torch.Generator(device="cpu").manual_seed(BASE_SEED + stage_index)
    return torch.randn(num_classes, dim, generator=g)


class TpSGDHead(nn.Module):
    """Holds P_i only: no trainable parameters."""

    def __init__(self, info: StageInfo):
        super().__init__()
        self.model_name = info.model_name
        self.register_buffer("projection", projection(info.num_classes, info.width, info.index))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """y_i: the stage's own output as feature vectors [..., W] (CNN: averaged over space)."""
        return features(h, self.model_name)

    def target(self, targets: torch.Tensor) -> torch.Tensor:
        """P_i y*: [..., W]."""
        return F.embedding(targets, self.projection)


class TpSGDOptions(Options):
    dim: Optional[int] = Field(None, ge=1, description="tpSGD: size of the target P·onehot(y); it is the stage output's width (no readout), so only that value (or null) is accepted.")


class TpSGD(LocalMethod):
    name = "tpsgd"
    options = TpSGDOptions

    def __init__(self, dim: Optional[int] = None):
        # The target's size is the stage output's width (Eq. 1 compares them directly); `dim` is
        # accepted only when it says the same.
        self.dim = dim

    def build_head(self, info: StageInfo) -> nn.Module:
        check_info(info)
        if self.dim is not None and self.dim != info.width:
            raise UserError(f"local.tpsgd.dim: the target has the stage output's width ({info.width}) "
                            f"in tpSGD (no readout), got {self.dim}; leave it unset")
        return TpSGDHead(info)

    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   x: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        # float32 MSE: bf16 squared errors lose visible precision.
        return F.mse_loss(head(h).float(), head.target(targets).float())

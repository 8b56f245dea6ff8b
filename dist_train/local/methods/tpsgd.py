"""tpSGD: local regression onto a fixed random projection of the label.

Lomnitz, Daniels, Zhang, Piacentino, "Learning with Local Gradients at the Edge" (tpSGD, target
projection SGD), arXiv 2208.08503.

WHY: instead of learning an auxiliary classifier, each layer gets a *target* t_i = P_i y made by a
fixed random projection P_i of the one-hot label. A random projection keeps different classes'
targets apart (Johnson-Lindenstrauss), so regressing onto t_i makes the stage's features
class-discriminative, while the target needs no learned parameters and no backward messages.

Here (as in the brief): P is a [C, D] buffer, t = P^T onehot(y) = P[y] (a row lookup, never a
one-hot matmul, which would cost C*D per example for the GPT's vocabulary), D = the stage width by
default; the stage output is read by a trainable linear readout (CNN: after spatial averaging;
GPT: at every position, label = next token), and the loss is the MSE between readout and t.
  * P is N(0, 1) so every target entry has unit variance and the MSE starts O(1) whatever C.
  * P is a non-trainable (persistent) buffer (moves with .to(), saved in checkpoints, never
    in the optimizer), generated on the CPU from a generator seeded with BASE_SEED + stage index:
    the same stage gets the same P on every rank, restart and device, and different stages get
    different projections, as in the paper (one P_i per layer).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.local.method import LocalMethod, StageInfo
from dist_train.local.methods._common import check_info, features

BASE_SEED = 0x7D5  # any fixed constant; only "same stage -> same P" matters


def projection(num_classes: int, dim: int, stage_index: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(BASE_SEED + stage_index)
    return torch.randn(num_classes, dim, generator=g)


class TpSGDHead(nn.Module):
    def __init__(self, info: StageInfo, dim: int):
        super().__init__()
        self.model_name = info.model_name
        self.register_buffer("projection", projection(info.num_classes, dim, info.index))
        self.readout = nn.Linear(info.width, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Readout [..., D] of the stage output."""
        return self.readout(features(h, self.model_name))

    def target(self, targets: torch.Tensor) -> torch.Tensor:
        """t = P^T onehot(y): [..., D]."""
        return F.embedding(targets, self.projection)


class TpSGD(LocalMethod):
    name = "tpsgd"

    def __init__(self, dim: Optional[int] = None):
        self.dim = dim  # target size D; None = the stage width

    def build_head(self, info: StageInfo) -> nn.Module:
        check_info(info)
        return TpSGDHead(info, self.dim or info.width)

    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   x: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        # float32 MSE: bf16 squared errors lose visible precision.
        return F.mse_loss(head(h).float(), head.target(targets).float())

"""InfoPro: each local stage reconstructs the model INPUT x and predicts y, weighted by depth.

Wang, Ni, Song, Yang, Huang, "Revisiting Locally Supervised Learning: an Alternative to End-to-end
Training", ICLR 2021, arXiv 2101.10832; official code github.com/blackfeather-wang/InfoPro-Pytorch.

WHY: a stage trained on the task loss alone throws away information later stages would still have
used (it is "short-sighted", worse as K grows). The paper replaces its information-propagation
loss by the upper bound −λ1·I(h_k; x) − λ2·I(h_k; y) and estimates both mutual informations with
learned heads: a decoder that reconstructs x and a classifier that predicts y. Local module k
therefore minimises

    L_k = λ1_k · L_recons(w_k(h_k), x) + λ2_k · L_task(g_k(h_k), y)                       (1)

with a decoder w_k and an auxiliary classifier g_k trained with the module. Early modules weigh the
reconstruction more (keep everything about x), late modules the task term.

Weights across depth (the official code, `networks/resnet.py`): for local module k = 0..K-2,

    r_k = k / (K - 2)   (0 when K = 2),
    λ1_k = λ1_first·(1 - r_k) + λ1_last·r_k,   λ2_k = λ2_first·(1 - r_k) + λ2_last·r_k.   (2)

The four end points are tuned per K in the official commands (README, ResNet-110 on CIFAR-10,
with the contrastive task term):
K = 2: λ1 5, λ2 0.5 (one local module); K = 4: λ1 1 -> 0, λ2 0 -> 1; K = 8: λ1 5 -> 0, λ2 0 -> 1;
K = 16: λ1 5 -> 0.5, λ2 0 -> 1 (`PAPER_WEIGHTS`). An option left unset (`local.infopro.*: null`,
the default) takes the value of the row whose K is nearest to the run's (ties: the larger K, so
K = 3 uses K = 4's row, never K = 2's, whose end point is zero for both terms).

Decoder w_k and L_recons, as the official code (`Decoder` in `networks/auxiliary_nets.py`):
bilinear upsampling of h to the image size, conv3x3 to 12 channels, BatchNorm, ReLU, conv3x3 to
the image channels, sigmoid, and binary cross-entropy against the image restored to [0, 1] pixels
(its `_image_restore` undoes the input normalisation; here `info.image_norm`, the data set's per-channel
mean and std, does the same):
  * CNN: exactly that (upsampling only if h's spatial size differs from x's); sigmoid + BCE as
    `binary_cross_entropy_with_logits`, the numerically stable form of the same loss.
  * MLP (no counterpart in the paper, which only uses CNNs): Linear(W, W) + ReLU + Linear(W, D),
    the same sigmoid + BCE against the flattened image [B, D] (D from `info.input_shape`).
  * GPT (adaptation): x is token ids [B, T]; "reconstructing x" is predicting the input byte at
    every position, w = LayerNorm + Linear(W, vocab), cross-entropy against x.
  * An input that is not an image in [0, 1] (`info.image_norm` is None): MSE against x as given.
Task head g_k: the DGL-style classifier of `_common.small_classifier` with cross-entropy (the paper
reports both a cross-entropy and a supervised-contrastive task term; its best results use the
contrastive one with a conv+2fc head).

Named simplifications: the cross-entropy task term, not the contrastive one; the MLP decoder and
the GPT's byte "reconstruction" have no counterpart in the paper; MSE for non-image inputs.

x arrives detached on every non-last stage (`needs_input`: the runtime reads it from the
deterministic sampler, nothing extra is sent), so the reconstruction never pushes a gradient into
another stage.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pydantic import Field

from dist_train.config.options import Options
from dist_train.errors import UserError
from dist_train.local.method import LocalMethod, StageInfo
from dist_train.local.methods._common import check_info, small_classifier
from dist_train.models.loss import cross_entropy

# K -> (λ1_first, λ2_first, λ1_last, λ2_last): the official README's ResNet-110 CIFAR-10 commands
# (--ixx_1 --ixy_1 --ixx_2 --ixy_2 for --local_module_num K).
PAPER_WEIGHTS: dict[int, tuple[float, float, float, float]] = {
    2: (5.0, 0.5, 0.0, 0.0),
    4: (1.0, 0.0, 0.0, 1.0),
    8: (5.0, 0.0, 0.0, 1.0),
    16: (5.0, 0.0, 0.5, 1.0),
}
DECODER_CHANNELS = 12  # the official decoder's hidden width (12 * widen, widen = 1)


def paper_weights(num_stages: int) -> tuple[float, float, float, float]:
    """The official (λ1_first, λ2_first, λ1_last, λ2_last) for K stages: the row of the nearest
    tabulated K, ties to the larger."""
    k = min(PAPER_WEIGHTS, key=lambda t: (abs(t - num_stages), -t))
    return PAPER_WEIGHTS[k]


def depth_ratio(index: int, num_stages: int) -> float:
    """r_k of Eq. (2): 0 at the first stage, 1 at the last local stage (K - 2)."""
    return index / (num_stages - 2) if num_stages > 2 else 0.0


class InfoProHead(nn.Module):
    """g_k (`task`) and w_k (`decoder`) of Eq. (1)."""

    def __init__(self, info: StageInfo):
        super().__init__()
        w = info.width
        self.model_name = info.model_name
        self.task = small_classifier(info)
        if info.model_name == "gpt":
            self.decoder = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, info.num_classes, bias=False))
            return
        shape = tuple(info.input_shape)
        self.input_shape = shape
        if not shape:
            raise UserError(f"local.method: infopro needs the input shape of model '{info.model_name}' "
                            f"(StageInfo.input_shape is empty)")
        if info.model_name == "mlp":
            self.decoder = nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, math.prod(shape)))
        else:
            if len(shape) != 3:
                raise UserError(f"local.method: infopro's CNN decoder needs [C, H, W] inputs, got {shape}")
            self.image_size = tuple(shape[1:])
            self.decoder = nn.Sequential(
                nn.Conv2d(w, DECODER_CHANNELS, kernel_size=3, padding=1), nn.BatchNorm2d(DECODER_CHANNELS),
                nn.ReLU(), nn.Conv2d(DECODER_CHANNELS, shape[0], kernel_size=3, padding=1))
        # x * std + mean: the [0, 1] image the input was normalised from, per channel (None: not an image)
        self.image_norm = None
        if info.image_norm is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32) for v in info.image_norm)
            if len(shape) != 3 or len(mean) not in (1, shape[0]) or len(std) != len(mean):
                raise UserError(f"local.method: infopro got an image normalisation for {len(mean)} channels, "
                                f"the input has shape {shape}")
            self.image_norm = (mean.view(-1, 1, 1), std.view(-1, 1, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Task logits g_k(h)."""
        return self.task(h)

    def reconstruct(self, h: torch.Tensor) -> torch.Tensor:
        """w_k(h): GPT byte logits [B, T, V]; MLP [B, D]; CNN [B, C_in, H, W]."""
        if self.model_name == "cnn" and tuple(h.shape[-2:]) != self.image_size:
            h = F.interpolate(h, size=self.image_size, mode="bilinear", align_corners=True)
        return self.decoder(h)

    def reconstruction_loss(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """L_recons(w_k(h), x): BCE of sigmoid(w_k(h)) against the [0, 1] image (CNN, MLP), byte
        cross-entropy (GPT), MSE for an input that is not an image."""
        out = self.reconstruct(h)
        if self.model_name == "gpt":
            return cross_entropy(out, x)
        # float32: under bf16 autocast the loss loses visible precision.
        x = x.detach().float()
        if self.image_norm is None:
            return F.mse_loss(out.float(), x.reshape(out.shape))
        mean, std = (t.to(x.device) for t in self.image_norm)
        # clamp: only rounding can leave [0, 1] (the pixels were in it before normalisation).
        pixels = (x.reshape(-1, *self.input_shape) * std + mean).clamp(0.0, 1.0)
        return F.binary_cross_entropy_with_logits(out.float(), pixels.reshape(out.shape))


class InfoProOptions(Options):
    lambda1_first: Optional[float] = Field(None, ge=0, description="InfoPro: reconstruction weight lambda1 of the first stage, moving linearly to lambda1_last at the last local stage; default: the official code's value for this number of stages (K=2: 5; K=4: 1; K=8, 16: 5).")
    lambda2_first: Optional[float] = Field(None, ge=0, description="InfoPro: task weight lambda2 of the first stage, moving linearly to lambda2_last; default: the official code's value for this number of stages (K=2: 0.5; K=4, 8, 16: 0).")
    lambda1_last: Optional[float] = Field(None, ge=0, description="InfoPro: reconstruction weight lambda1 of the last local stage; default: the official code's value for this number of stages (K=4, 8: 0; K=16: 0.5).")
    lambda2_last: Optional[float] = Field(None, ge=0, description="InfoPro: task weight lambda2 of the last local stage; default: the official code's value for this number of stages (K=4, 8, 16: 1).")


class InfoPro(LocalMethod):
    name = "infopro"
    options = InfoProOptions
    needs_input = True  # Eq. (1) reconstructs the model input x on every local stage

    def __init__(self, lambda1_first: Optional[float] = None, lambda2_first: Optional[float] = None,
                 lambda1_last: Optional[float] = None, lambda2_last: Optional[float] = None):
        self.given_weights = (lambda1_first, lambda2_first, lambda1_last, lambda2_last)

    def weights(self, index: int, num_stages: int) -> tuple[float, float]:
        """(λ1_k, λ2_k) of Eq. (2) for stage `index` of `num_stages`."""
        l1a, l2a, l1b, l2b = (paper if mine is None else mine
                              for mine, paper in zip(self.given_weights, paper_weights(num_stages)))
        r = depth_ratio(index, num_stages)
        return l1a * (1 - r) + l1b * r, l2a * (1 - r) + l2b * r

    def build_head(self, info: StageInfo) -> nn.Module:
        check_info(info)
        return InfoProHead(info)

    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   x: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        if x is None:
            raise RuntimeError("infopro: local_loss needs the model input x (the method sets needs_input)")
        lam1, lam2 = self.weights(info.index, info.num_stages)
        # Both terms are always computed, so every head parameter gets a gradient (zero when its
        # weight is 0) and the head's parameter set does not depend on the stage.
        return lam1 * head.reconstruction_loss(h, x) + lam2 * cross_entropy(head(h), targets)

"""InfoPro: information-propagation loss = reconstruction + task, weighted by depth.

Wang, Ni, Song, Yang, Huang, "Revisiting Locally Supervised Learning: an Alternative to End-to-end
Training", ICLR 2021, arXiv 2101.10832.

WHY: a stage trained on the task loss alone greedily throws away information that later stages
would still have used ("short-sightedness", worse as K grows). InfoPro's upper bound on its
information-propagation objective boils down to

    L_k = lambda1_k * reconstruction(input | h_k) + lambda2_k * task(y | h_k),

so a stage must keep enough of its input to rebuild it while becoming predictive of y. Early stages
should keep more (reconstruction weighs more), late stages may discard task-irrelevant detail.

Weights (our choice, a linear interpolation in the spirit of the paper's depth-wise schedule):
    lambda2_k = (k + 1) / K,  lambda1_k = 1 - lambda2_k
for stage k of K. Stage 0 of 2 gets 0.5 / 0.5; the last local stage (k = K-2) gets 1/K / (K-1)/K;
the formula would give the last stage (k = K-1) pure task loss, which is what it trains on anyway.

Reconstruction target (our choice; the paper reconstructs the image x at every module, which in a
multi-rank pipeline would mean shipping x to every stage):
  * stage k > 0: the stage's own input, i.e. the activation it received (exactly h's shape),
    reconstructed with MSE. This needs no extra traffic.
  * stage 0 receives the raw model input, whose feature size is not in StageInfo:
      - GPT: the input is token ids [B, T]. The "reconstruction" is cross-entropy of predicting the
        current token at each position (an identity decoder LayerNorm + Linear(W, vocab)).
      - MLP: the flattened input [B, D] is average-pooled (parameter-free, `adaptive_avg_pool1d`) to
        W features and reconstructed with MSE -- exact when D == W, a fixed low-pass summary
        otherwise, so the head can be built before the first batch.
      - CNN: the input image averaged over its channels, [B, 1, H, W'] (exact for the 1-channel
        digits), resized to h's spatial size if needed, reconstructed with MSE.
  * if `stage_input` is None the reconstruction term is dropped (task term only).
The target is always detached: the reconstruction must never push a gradient into the previous
stage (the isolation property of local learning).

Head: the DGL-style task classifier plus a small decoder (GPT: LayerNorm + Linear to vocab at stage
0, else Linear-GELU-Linear; MLP: Linear-ReLU-Linear; CNN: conv3x3-ReLU-conv3x3).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.local.method import LocalMethod, StageInfo
from dist_train.local.methods._common import check_info, small_classifier
from dist_train.models.loss import cross_entropy


def depth_weights(index: int, num_stages: int) -> tuple[float, float]:
    """(lambda1 reconstruction, lambda2 task) for stage `index` of `num_stages`."""
    lam2 = (index + 1) / num_stages
    return 1.0 - lam2, lam2


class InfoProHead(nn.Module):
    def __init__(self, info: StageInfo):
        super().__init__()
        w = info.width
        self.model_name = info.model_name
        self.first = info.index == 0
        self.task = small_classifier(info)
        if info.model_name == "gpt":
            if self.first:
                # Identity "decoder": predict the token at the current position from h.
                self.decoder = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, info.num_classes, bias=False))
            else:
                # No LayerNorm: the received residual stream's scale is part of what must be rebuilt.
                self.decoder = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, w))
        elif info.model_name == "mlp":
            self.decoder = nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w))
        else:
            out = 1 if self.first else w  # stage 0 rebuilds the channel-mean image
            self.decoder = nn.Sequential(nn.Conv2d(w, w, kernel_size=3, padding=1), nn.ReLU(),
                                         nn.Conv2d(w, out, kernel_size=3, padding=1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Task logits (what the stage would predict)."""
        return self.task(h)

    def reconstruction_target(self, stage_input: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        x = stage_input.detach()
        if not self.first or self.model_name == "gpt":
            return x  # received activation (same shape as h), or GPT token ids
        if self.model_name == "mlp":
            x = x.reshape(x.size(0), -1).float()
            if x.size(1) != h.size(1):
                x = F.adaptive_avg_pool1d(x.unsqueeze(1), h.size(1)).squeeze(1)
            return x
        x = x.float().mean(dim=1, keepdim=True)
        if x.shape[-2:] != h.shape[-2:]:
            x = F.adaptive_avg_pool2d(x, h.shape[-2:])
        return x

    def reconstruction_loss(self, h: torch.Tensor, stage_input: torch.Tensor) -> torch.Tensor:
        target = self.reconstruction_target(stage_input, h)
        out = self.decoder(h)
        if self.model_name == "gpt" and self.first:
            return cross_entropy(out, target)
        # float32 MSE: under bf16 autocast a squared error loses visible precision.
        return F.mse_loss(out.float(), target.float())


class InfoPro(LocalMethod):
    name = "infopro"

    def __init__(self, lambda1_first: float = 1.0, lambda1_last: float = 0.0, lambda2_first: float = 0.1,
                 lambda2_last: float = 1.0):
        self.lambda1 = (lambda1_first, lambda1_last)
        self.lambda2 = (lambda2_first, lambda2_last)

    def build_head(self, info: StageInfo) -> nn.Module:
        check_info(info)
        return InfoProHead(info)

    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   x: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        stage_input = x
        lam1, lam2 = depth_weights(info.index, info.num_stages)
        loss = lam2 * cross_entropy(head(h), targets)
        if stage_input is not None and lam1 > 0:
            loss = loss + lam1 * head.reconstruction_loss(h, stage_input)
        return loss

"""Pieces the local-learning methods share: pooling, the model's kind of output head, small heads.

Every method must work for the three reference models, whose stage outputs differ in shape:
GPT h is [B, T, W] (one example per position, targets [B, T]); MLP h is [B, W]; CNN h is
[B, W, H, W'] (targets [B]). The helpers below hide that difference so each method file only
states its own head and loss.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dist_train.errors import UserError
from dist_train.local.method import StageInfo

MODELS = ("gpt", "mlp", "cnn")


def check_info(info: StageInfo) -> None:
    """Fail early, with a config-style message, on a model these heads were not written for."""
    if info.model_name not in MODELS:
        raise UserError(f"local.method: no auxiliary head for model '{info.model_name}' "
                        f"(supported: {', '.join(MODELS)})")


class GlobalAvgPool(nn.Module):
    """[B, C, H, W] -> [B, C]. The reference CNN head pools globally too, so a local head that pools
    sees features the same way the real head will."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


def features(h: torch.Tensor, model_name: str) -> torch.Tensor:
    """Per-example feature vectors: CNN maps are averaged over space; GPT/MLP are already vectors
    (GPT keeps its [B, T, W] layout: every position is an example).

    Takes the model name rather than the StageInfo so heads need not keep a StageInfo (whose
    `later_blocks` holds model modules) as an attribute."""
    return h.mean(dim=(-2, -1)) if model_name == "cnn" else h


def flat_examples(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] features and [...] targets -> [N, D] and [N], so GPT positions and classifier
    samples go down one code path."""
    return x.reshape(-1, x.size(-1)), targets.reshape(-1)


def output_head(info: StageInfo) -> nn.Module:
    """The model's own kind of output head, freshly initialised: GPT LayerNorm + Linear to the
    vocabulary (as `models.gpt.Head`); classifiers (pool for the CNN) + Linear to the classes."""
    w, c = info.width, info.num_classes
    if info.model_name == "gpt":
        return nn.Sequential(nn.LayerNorm(w), nn.Linear(w, c, bias=False))
    if info.model_name == "cnn":
        return nn.Sequential(GlobalAvgPool(), nn.Linear(w, c))
    return nn.Linear(w, c)


def small_classifier(info: StageInfo) -> nn.Module:
    """The DGL-style auxiliary classifier, one hidden layer deep for the classifiers.

    GPT: LayerNorm + Linear(W, vocab) -- a hidden layer per position would cost as much as a block.
    MLP: Linear(W, W) + ReLU + Linear(W, C).
    CNN: conv 3x3 + ReLU + global average pool + Linear(W, C) (DGL's conv head, without its
    spatial-pyramid pooling, which 8x8 maps do not need).
    """
    check_info(info)
    w, c = info.width, info.num_classes
    if info.model_name == "gpt":
        return nn.Sequential(nn.LayerNorm(w), nn.Linear(w, c, bias=False))
    if info.model_name == "mlp":
        return nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, c))
    return nn.Sequential(nn.Conv2d(w, w, kernel_size=3, padding=1), nn.ReLU(), GlobalAvgPool(),
                         nn.Linear(w, c))


def fresh_copy(module: nn.Module) -> nn.Module:
    """Same architecture, new tensors, new random init, trainable (AugLocal's and MAN's heads copy the
    architecture of later blocks, never their weights; NoProp's extra steps copy a stage's blocks)."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    for p in clone.parameters():
        p.grad = None  # deepcopy also copies .grad and a frozen flag; the copy starts clean
        p.requires_grad_(True)
    clone.train()
    return clone

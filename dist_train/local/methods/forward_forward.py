"""Forward-Forward, adapted to one supervised local stage.

Hinton, "The Forward-Forward Algorithm: Some Preliminary Investigations", arXiv 2212.13345.

FF trains each layer to give high "goodness" (sum of squared activities) to positive data and low
goodness to negative data, with a per-layer logistic loss on goodness - threshold. In the
supervised variant the label is part of the input: positive = (x, true label), negative =
(x, wrong label), and prediction tries every label and picks the best goodness.

Adaptation here (the stage's blocks are arbitrary, so the label cannot be put into the stage's
input without changing the model): the head combines the stage output with a learned label
embedding,

    z(h, y) = ReLU(P · norm(features(h)) + E[y]),    goodness g(h, y) = mean_j z_j^2,
    loss = softplus(-(g(h, y+) - theta)) + softplus(g(h, y-) - theta),

trained together with the stage, so the gradient of the FF loss reaches the stage's blocks through
P. WHY each piece:
  * norm = LayerNorm without affine, as FF length-normalises a layer's input: the goodness must
    come from the direction of h, not from its scale (else the stage could just grow h).
  * mean instead of sum of squares (= sum / D, theta = 1 instead of theta = D): keeps the logistic
    argument O(1) whatever the head width D, so one learning rate fits all models.
  * negatives: one wrong label per example, y- = (y + U{1..C-1}) mod C -- uniform over the wrong
    labels (Hinton also uses the net's own hardest wrong label; that needs a goodness for all C
    labels, C = vocabulary for the GPT, too costly per step).
  * randomness: torch's global RNG (`torch.randint` / `torch.randperm` on h's device). Seeding from
    the batch content would need a host sync per step (bad for a GPU pipeline); the framework seeds
    torch per rank, so runs stay reproducible.
  * GPT: every position is an example with its next token as label; positions are subsampled to at
    most `max_positions` per step (uniformly, without replacement) to keep the head cheap.
  * CNN: maps are averaged over space first.

`predict(head, h)` gives the FF decision rule (argmax over labels of the goodness).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.errors import UserError
from dist_train.local.method import LocalMethod, StageInfo
from dist_train.local.methods._common import check_info, features, flat_examples


class ForwardForwardHead(nn.Module):
    def __init__(self, info: StageInfo, dim: int):
        super().__init__()
        self.model_name = info.model_name
        self.num_classes = info.num_classes
        self.norm = nn.LayerNorm(info.width, elementwise_affine=False)
        self.proj = nn.Linear(info.width, dim)
        self.label = nn.Embedding(info.num_classes, dim)

    def examples(self, h: torch.Tensor) -> torch.Tensor:
        """[..., W] normalised per-example features (CNN pooled)."""
        return self.norm(features(h, self.model_name))

    def goodness(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x [N, W] normalised features, labels [N] -> goodness [N] (float32)."""
        z = F.relu(self.proj(x) + self.label(labels))
        return z.float().pow(2).mean(dim=-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Goodness of every label: [..., C]. O(N*C*D) -- for evaluation, not for the local loss."""
        x = self.proj(self.examples(h))
        z = F.relu(x.unsqueeze(-2) + self.label.weight)
        return z.float().pow(2).mean(dim=-1)


class ForwardForward(LocalMethod):
    name = "forward_forward"

    def __init__(self, dim: Optional[int] = None, threshold: float = 1.0, max_positions: int = 256):
        if max_positions < 1:
            raise UserError(f"local.method: forward_forward max_positions must be >= 1, got {max_positions}")
        self.dim = dim  # head width D; None = the stage width
        self.threshold = threshold
        self.max_positions = max_positions

    def build_head(self, info: StageInfo) -> nn.Module:
        check_info(info)
        if info.num_classes < 2:
            raise UserError("local.method: forward_forward needs at least 2 classes for negative labels")
        return ForwardForwardHead(info, self.dim or info.width)

    def local_loss(self, head: nn.Module, h: torch.Tensor, targets: torch.Tensor,
                   stage_input: Optional[torch.Tensor], info: StageInfo) -> torch.Tensor:
        x, y = flat_examples(head.examples(h), targets)
        if info.task == "lm" and x.size(0) > self.max_positions:
            keep = torch.randperm(x.size(0), device=x.device)[: self.max_positions]
            x, y = x[keep], y[keep]
        c = head.num_classes
        y_neg = (y + torch.randint(1, c, y.shape, device=y.device)) % c
        g_pos = head.goodness(x, y)
        g_neg = head.goodness(x, y_neg)
        # softplus(-a) = -log sigmoid(a): the logistic loss of "positive is good, negative is not".
        return (F.softplus(self.threshold - g_pos) + F.softplus(g_neg - self.threshold)).mean()

    @staticmethod
    def predict(head: ForwardForwardHead, h: torch.Tensor) -> torch.Tensor:
        """FF inference: the label whose goodness is highest, [...] ids."""
        return head(h).argmax(dim=-1)

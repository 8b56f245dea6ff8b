"""Forward-Forward, supervised, as Hinton defines it (arXiv 2212.13345, sections 2 and 3.3).

The label is embedded into the input: the first C entries of the flattened input are replaced by
one-hot(y) (times `local.forward_forward.label_scale`), as Hinton does with the first 10 pixels of
MNIST. Positive data carries the true label, negative data the same input with a wrong label drawn
uniformly from the C − 1 others (Hinton's simplest negatives). Every layer (the embedding layer and
each block) is trained on its own activations y_j only, with the logistic loss of Eq. (1),

    p(positive) = σ( Σ_j y_j² − θ ),
    L_layer = −log σ(G_pos − θ) − log(1 − σ(G_neg − θ)) = softplus(θ − G_pos) + softplus(G_neg − θ),

G = Σ_j y_j² the layer's goodness (sum over all its units), θ = `threshold` (default: the number of
units, so unit-size activities sit at the threshold). Between layers the activity vector is
length-normalised and detached, so a layer passes on only the direction of its output and no
gradient reaches the layer below. A stage's local loss is the sum of its layers' losses (mean over
examples); the last stage trains the same way (the model's softmax head is not used).

Prediction (section 3.3): run the input once with each label embedded and pick the label with the
highest goodness accumulated over every layer but the first. In the pipeline each stage adds its
layers' goodness to a running total that travels with the activations; the last stage returns the
totals [B, C] as its scores (so `val_acc` is the goodness prediction; `val_loss` is the
cross-entropy of those scores, a figure for monitoring, not a calibrated likelihood).

Across ranks a training message is the positive and negative activations stacked, [2B, ...]: twice
a greedy method's bytes, inherent to FF. Only the classifiers (MLP, CNN) are supported: on the
byte-level GPT the label is the next token, and embedding it in a causal input would leak it.

Named choices: normalisation to RMS 1 (length √n) instead of length 1, which only rescales the next
layer's input; negatives drawn uniformly, not the hardest wrong label.
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
from dist_train.local.stage import StageModule


def embed_label(x: torch.Tensor, labels: torch.Tensor, num_classes: int, scale: float) -> torch.Tensor:
    """x [B, ...] with its first C flattened entries replaced by scale * one-hot(labels)."""
    flat = x.reshape(x.size(0), -1).clone()
    flat[:, :num_classes] = scale * F.one_hot(labels, num_classes).to(flat.dtype)
    return flat.view_as(x)


def goodness(y: torch.Tensor) -> torch.Tensor:
    """G = Σ_j y_j² per example (float32), over all of a layer's units."""
    return y.float().pow(2).flatten(1).sum(dim=1)


def normalise(y: torch.Tensor) -> torch.Tensor:
    """Length-normalise per example (to RMS 1) and detach: the next layer sees only the direction."""
    flat = y.detach().flatten(1)
    rms = flat.float().pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-6)
    return (flat / rms.to(flat.dtype)).view_as(y)


def ff_layer_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mean over examples of softplus(θ − G_pos) + softplus(G_neg − θ) (Hinton's Eq. 1, both sides)."""
    return (F.softplus(threshold - g_pos) + F.softplus(g_neg - threshold)).mean()


class ForwardForwardOptions(Options):
    threshold: Optional[float] = Field(None, gt=0, description="Forward-Forward: goodness threshold theta; default: the layer's number of units.")
    label_scale: float = Field(1.0, gt=0, description="Forward-Forward: value written into the input's first C entries for the label (one-hot).")


class ForwardForward(LocalMethod):
    name = "forward_forward"
    options = ForwardForwardOptions

    @classmethod
    def check(cls, cfg, world_size: int) -> None:
        from dist_train.registry import MODELS

        if MODELS.get(cfg.model.name).task != "classify":
            raise UserError(f"local.method: forward_forward needs a classifier (model.name mlp or cnn): its "
                            "prediction embeds each candidate label in the input")

    @classmethod
    def plan_stages(cls, cfg, ranges: list[range]) -> tuple[list[str], str]:
        parts, _ = super().plan_stages(cfg, ranges)
        return parts, "positive and negative activations forward (2x)" + (
            "" if cfg.local.send_targets else " (targets read locally)")

    def __init__(self, threshold: Optional[float] = None, label_scale: float = 1.0):
        if threshold is not None and threshold <= 0:
            raise UserError(f"local.forward_forward.threshold: must be > 0, got {threshold}")
        self.threshold, self.label_scale = threshold, label_scale

    def build_stage(self, model: nn.Module, blocks: range, info: StageInfo) -> StageModule:
        if info.task != "classify":
            raise UserError("local.method: forward_forward needs a classifier (model.name mlp or cnn): its "
                            "prediction embeds each candidate label in the input, which a causal language "
                            "model's next-token label cannot be")
        if info.num_classes < 2:
            raise UserError("local.method: forward_forward needs at least 2 classes for negative labels")
        return FFStage(model, blocks, self, info)

    def build_head(self, info: StageInfo) -> nn.Module:
        raise UserError("local.method: forward_forward has no auxiliary head (each layer trains on its goodness)")

    def local_loss(self, head, h, targets, x, info) -> torch.Tensor:
        raise UserError("local.method: forward_forward's loss is per layer, computed by its stage module")


class FFStage(StageModule):
    """The stage's FF layers: the embedding layer (stage 0) and its blocks."""

    def __init__(self, model: nn.Module, blocks: range, method: ForwardForward, info: StageInfo):
        super().__init__(info)
        self.method = method
        self.embed = model.embed if self.first else None
        self.blocks = nn.ModuleList(model.blocks[i] for i in blocks)
        self.reads_data = self.first

    def layers(self) -> list[nn.Module]:
        return ([self.embed] if self.embed is not None else []) + list(self.blocks)

    def _threshold(self, y: torch.Tensor) -> float:
        return self.method.threshold if self.method.threshold is not None else float(y[0].numel())

    def _labelled(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return embed_label(x, labels, self.info.num_classes, self.method.label_scale)

    def forward(self, x: Optional[torch.Tensor] = None, received: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None, on_activation=None):
        return self._predict(x, received) if y is None else self._train(x, received, y, on_activation)

    def _train(self, x, received, y, on_activation) -> torch.Tensor:
        if self.first:
            c = self.info.num_classes
            wrong = (y + torch.randint(1, c, y.shape, device=y.device)) % c
            h = torch.cat([self._labelled(x, y), self._labelled(x, wrong)])
        else:
            h = received  # [2B, ...]: positives then negatives, normalised by the previous stage
        loss = torch.zeros((), device=h.device)
        for layer in self.layers():
            out = layer(h)
            g_pos, g_neg = goodness(out).chunk(2)
            loss = loss + ff_layer_loss(g_pos, g_neg, self._threshold(out))
            h = normalise(out)
        if on_activation is not None:
            on_activation(h)
        return loss

    def _predict(self, x, received) -> torch.Tensor:
        c = self.info.num_classes
        if self.first:  # every candidate label, label-major: rows [j*B, (j+1)*B) carry label j
            b = x.size(0)
            h = torch.cat([self._labelled(x, torch.full((b,), j, dtype=torch.long, device=x.device))
                           for j in range(c)])
            total = torch.zeros(c * b, device=x.device)
        else:
            h, total = received[:, :-1], received[:, -1]
            if h.dim() > 2:  # CNN maps travel with the total as one extra channel
                total = total.flatten(1)[:, 0]
            h = h.contiguous()
        for i, layer in enumerate(self.layers()):
            out = layer(h)
            if not (self.first and i == 0):  # Hinton: the goodness of every layer but the first
                total = total + goodness(out)
            h = normalise(out)
        if self.last:
            return total.view(c, -1).t()  # [B, C] goodness of each label
        if h.dim() > 2:
            extra = total.view(-1, 1, *([1] * (h.dim() - 2))).expand(-1, 1, *h.shape[2:])
        else:
            extra = total.view(-1, 1)
        return torch.cat([h.float(), extra.float()], dim=1)

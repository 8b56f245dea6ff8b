"""Image classification (digits, shapes32) with the MLP or the CNN."""

from __future__ import annotations

import torch

from dist_train.tasks.base import Task


class Classification(Task):
    name = "classify"

    def num_outputs(self, info) -> int:
        return info.num_classes

    def example_input(self, cfg, info, batch, device="meta"):
        return torch.zeros(batch, *info.input_shape, device=device)

    def eval_sums(self, outputs, targets, model):
        return {"acc": float((outputs.argmax(-1) == targets).float().mean())}

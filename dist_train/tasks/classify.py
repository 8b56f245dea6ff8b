"""Image classification (digits, shapes32) with the MLP or the CNN."""

from __future__ import annotations

import math

import torch

from dist_train.errors import UserError
from dist_train.tasks.base import Task


class Classification(Task):
    name = "classify"

    def build_model(self, cfg_model, info):
        from dist_train.models.cnn import CNN
        from dist_train.models.mlp import MLP

        if info.input_shape is None or info.num_classes is None:
            raise UserError(f"model.name: {cfg_model.name} needs an image data set with labels")
        if cfg_model.name == "mlp":
            return MLP(math.prod(info.input_shape), info.num_classes, cfg_model.n_layer,
                       cfg_model.width, cfg_model.dropout)
        if cfg_model.name == "cnn":
            if len(info.input_shape) != 3:
                raise UserError(f"model.name: cnn needs [C,H,W] inputs, got shape {tuple(info.input_shape)}")
            channels, height, _ = info.input_shape
            return CNN(channels, height, info.num_classes, cfg_model.n_layer, cfg_model.width, cfg_model.dropout)
        raise UserError(f"model.name: {cfg_model.name} cannot read an image data set (use mlp or cnn)")

    def num_outputs(self, info) -> int:
        return info.num_classes

    def example_input(self, cfg, info, batch, device="meta"):
        return torch.zeros(batch, *info.input_shape, device=device)

    def eval_sums(self, outputs, targets, model):
        return {"acc": float((outputs.argmax(-1) == targets).float().mean())}

"""Reference models. Each is `embed -> blocks (ModuleList) -> head`, has `task` ("lm" or
"classify") and `loss(outputs, targets)`, so stage splitting and sharding can treat them alike."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch.nn as nn

from dist_train.config.schema import ModelSection
from dist_train.errors import UserError
from dist_train.models.cnn import CNN
from dist_train.models.gpt import GPT, Block
from dist_train.models.loss import cross_entropy
from dist_train.models.mlp import MLP

if TYPE_CHECKING:  # avoid importing the data package (and sklearn) just to build a model
    from dist_train.data.base import DataInfo

__all__ = ["GPT", "Block", "MLP", "CNN", "build_model", "count_parameters", "cross_entropy"]


def build_model(cfg_model: ModelSection, info: "DataInfo") -> nn.Module:
    """Instantiate the model named in the config, sized by the data set's `info`."""
    if cfg_model.name == "gpt":
        if info.task != "lm" or info.vocab_size is None:
            raise UserError("model.name: gpt needs a token data set (stdlib_bytes or token_bin)")
        return GPT(info.vocab_size, cfg_model.n_layer, cfg_model.width, cfg_model.n_head,
                   cfg_model.block_size, cfg_model.dropout)
    if info.task != "classify" or info.input_shape is None or info.num_classes is None:
        raise UserError(f"model.name: {cfg_model.name} needs an image data set (digits)")
    if cfg_model.name == "mlp":
        return MLP(math.prod(info.input_shape), info.num_classes, cfg_model.n_layer,
                   cfg_model.width, cfg_model.dropout)
    if cfg_model.name == "cnn":
        if len(info.input_shape) != 3:
            raise UserError(f"model.name: cnn needs [C,H,W] inputs, got shape {tuple(info.input_shape)}")
        channels, height, _ = info.input_shape
        return CNN(channels, height, info.num_classes, cfg_model.n_layer, cfg_model.width, cfg_model.dropout)
    raise UserError(f"model.name: unknown model {cfg_model.name!r}")


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once; DTensors at global size)."""
    return sum(p.numel() for p in model.parameters())

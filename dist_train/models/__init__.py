"""The models. Each is `embed -> blocks (ModuleList) -> head` with `loss(outputs, targets)`, so stage
splitting and sharding can treat them alike; each is registered by name (`dist_train.registry.MODELS`)
with a `ModelSpec` (`models/spec.py`) that says which task's data it reads, its own `model.*` keys
and how to build it. A model of one's own: `register_model` or an import path as model.name
(`models/factory.py`); what each training feature needs of a model: `models/protocol.py`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from dist_train.config.schema import ModelSection
from dist_train.models.cnn import CNN
from dist_train.models.factory import register_model
from dist_train.models.gpt import GPT, Block
from dist_train.models.loss import cross_entropy
from dist_train.models.mlp import MLP

if TYPE_CHECKING:  # avoid importing the data package (and sklearn) just to build a model
    from dist_train.data.base import DataInfo

__all__ = ["GPT", "Block", "MLP", "CNN", "build_model", "count_parameters", "cross_entropy", "register_model"]


def build_model(cfg_model: ModelSection, info: "DataInfo") -> nn.Module:
    """Instantiate the model named in the config, sized by the data set's `info`: the data set's task
    builds it from the model's spec (the PDE task wraps the basis network in its constraint)."""
    from dist_train.tasks import get_task

    return get_task(info.task).build_model(cfg_model, info)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once; DTensors at global size)."""
    return sum(p.numel() for p in model.parameters())

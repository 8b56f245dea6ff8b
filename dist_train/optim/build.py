"""Optimizer construction: parameter routing into decay / no-decay groups, and the optimizer class.

Returned as a spec (class, groups, kwargs) rather than an instance because some backends build the
optimizer themselves around the class (FairScale's OSS shards it; DeepSpeed wraps it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dist_train.config.schema import OptimSection


@dataclass
class OptimizerSpec:
    cls: type[torch.optim.Optimizer]
    param_groups: list[dict[str, Any]]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> torch.optim.Optimizer:
        return self.cls(self.param_groups, **self.kwargs)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices of linear/conv layers; exempt biases, norms and embeddings (as nanoGPT/torchtitan)."""
    decay, no_decay = [], []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_embedding = isinstance(module, nn.Embedding)
            (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def optimizer_spec(cfg: OptimSection, model: nn.Module) -> OptimizerSpec:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        # foreach: one fused kernel per group on GPU, fewer Python loops on CPU.
        return OptimizerSpec(torch.optim.AdamW, groups,
                             {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "foreach": True})
    if cfg.name == "sgd":
        return OptimizerSpec(torch.optim.SGD, groups, {"lr": cfg.lr, "momentum": cfg.beta1})
    raise ValueError(f"optim.name: {cfg.name} is not available")

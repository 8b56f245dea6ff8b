"""Optimizer construction: parameter routing into groups, and the optimizer class.

Returned as a spec (class, groups, kwargs) rather than an instance because some backends build the
optimizer themselves around the class (FairScale's OSS shards it; DeepSpeed wraps it). The factory
gets the backend's data-parallel (sub-)mesh: Muon and NorMuon distribute their orthogonalisation over
it. Each group carries `lr_ratio`, its lr relative to `optim.lr`; `set_lr` keeps those ratios under
the schedule (Muon's matrices and its AdamW groups scale together).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from dist_train.config.schema import OptimSection
from dist_train.optim.routing import route_parameters

@dataclass
class OptimizerSpec:
    cls: type[torch.optim.Optimizer]
    param_groups: list[dict[str, Any]]
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Parameters whose gradient the optimizer reduces over the ranks itself (owner-computes Muon
    # reduce-scatters them to their owners): a data-parallel wrapper must leave them alone.
    self_reduced: list[str] = field(default_factory=list)
    param_names: dict = field(default_factory=dict)  # parameter -> name, for sharded checkpoints

    def build(self) -> torch.optim.Optimizer:
        optimizer = self.cls(self.param_groups, **self.kwargs)
        if hasattr(optimizer, "param_names"):
            optimizer.param_names = dict(self.param_names)
        return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the scheduled lr, keeping each group's ratio to it."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices of linear/conv layers; exempt biases, norms and embeddings (as nanoGPT/torchtitan).
    A parameter shared by two modules (a tied embedding and output head) is grouped once, by its first
    module (the embedding: no decay)."""
    decay, no_decay, seen = [], [], set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_embedding = isinstance(module, nn.Embedding)
            (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _ns_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[name]


def matrix_optimizer_spec(cfg: OptimSection, model: nn.Module, mesh, num_outputs: Optional[int],
                          cls: type[torch.optim.Optimizer], own_kwargs: dict[str, Any]) -> OptimizerSpec:
    """`cls` (Muon / NorMuon, with `own_kwargs`) on the routed hidden matrices, AdamW (same schedule,
    own lr) on the rest."""
    m = cfg.matrix
    routes = route_parameters(model, num_outputs, m.matrix_params, m.adamw_params)
    ratio = (m.adamw_lr / cfg.lr) if m.adamw_lr is not None else 1.0
    groups = [
        {"params": [p for _, p in routes.matrix], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in routes.adamw_decay], "algorithm": "adamw", "lr": cfg.lr * ratio,
         "lr_ratio": ratio, "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in routes.adamw_no_decay], "algorithm": "adamw", "lr": cfg.lr * ratio,
         "lr_ratio": ratio, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    device = next(model.parameters()).device
    common = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "ns_steps": m.ns_steps,
              "ns_coefficients": m.ns_coefficients, "ns_dtype": _ns_dtype(m.ns_dtype, device),
              "process_group": mesh.get_group() if mesh is not None else None,
              "owner_compute": m.owner_compute}
    kwargs = {**common, **own_kwargs}
    names = {p: n for n, p in routes.matrix + routes.adamw_decay + routes.adamw_no_decay}
    return OptimizerSpec(cls, groups, kwargs, self_reduced=[n for n, _ in routes.matrix] if m.owner_compute else [],
                         param_names=names)


def optimizer_spec(cfg: OptimSection, model: nn.Module, mesh=None,
                   num_outputs: Optional[int] = None) -> OptimizerSpec:
    """The torch optimizer `optim.name` builds (its registered class's `torch_optimizer`). `mesh`: the
    data-parallel (sub-)mesh the model is replicated or sharded over (None: one process).
    `num_outputs`: the model's output size (vocabulary or classes), which tells the routing which
    matrices are output heads."""
    from dist_train.registry import OPTIMIZERS

    return OPTIMIZERS.get(cfg.name).torch_optimizer(cfg, model, mesh, num_outputs)

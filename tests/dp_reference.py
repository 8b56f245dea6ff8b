"""The independent reference for per-example gradient norms: one backward pass per example."""

from __future__ import annotations

import torch


def single_example_grad_norms(model: torch.nn.Module, loss_fn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """‖∇θ loss_fn(model(x_i), t_i)‖₂ over all of `model`'s parameters, for each example i, by a
    separate backward pass of each (what per-example clipping must clip)."""
    norms = []
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), t[i:i + 1]).backward()
        norms.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())))
    return torch.stack(norms)

"""Measured stage balancing: time each block's forward + backward on one micro-batch, on the device
the run trains on, and cut where the measured costs balance.

Parameter count is a fair proxy for the reference models, whose blocks are alike; it is blind to
compute that has no parameters (attention over a long context, repeated or wide activations) and to
the embedding and head. The embedding always runs with block 0 and the head with the last block, so
their measured costs are added to those blocks. Auxiliary heads are left out: every stage but the
last has one, a roughly constant extra per stage.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs, after one untimed run (lazy init, caches)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_block_costs(model: nn.Module, example: torch.Tensor, device: torch.device,
                        repeats: int = 3) -> list[float]:
    """Seconds of forward + backward per block for `example` (one micro-batch of inputs), with the
    embedding's cost added to block 0 and the head's to the last block. Leaves no gradients behind."""
    model = model.to(device)
    x = example.to(device)

    def fwd_bwd(module: nn.Module, inp: torch.Tensor):
        def run():
            out = module(inp)
            out.float().square().mean().backward()
        return run

    embed_cost = _timed(fwd_bwd(model.embed, x), device, repeats)
    with torch.no_grad():
        h = model.embed(x)
    costs = []
    for block in model.blocks:
        inp = h.detach().requires_grad_()
        costs.append(_timed(fwd_bwd(block, inp), device, repeats))
        with torch.no_grad():
            h = block(h)
    costs[0] += embed_cost
    costs[-1] += _timed(fwd_bwd(model.head, h.detach().requires_grad_()), device, repeats)
    model.zero_grad(set_to_none=True)
    return costs

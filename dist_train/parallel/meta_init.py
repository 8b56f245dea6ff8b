"""Build on meta, shard, then initialise each rank's own shard, with weights that do not depend on the
world size.

A model that brings its own initialisation (`init_weights()`, torchtitan's protocol) is built on the
meta device (no memory), sharded there by a backend that can (FSDP2's `fully_shard` per block and
root), moved to its device with `to_empty` (each rank allocates only its shard), and initialised in
place under `torch.no_grad()`. A backend that needs whole weights (DDP, DeepSpeed, none) has them
materialised before it wraps the model. Peak memory per rank during set-up thus scales with 1/dp
under FSDP.

The same seed must give the same full weights at 1, 2 or 4 ranks. On CUDA, DTensor's random ops get
that from the offset the full tensor would use; on CPU they draw each shard from the local generator,
so here it holds by construction: every random in-place fill of a parameter (aten's `normal_`,
`uniform_`, ..., which `torch.nn.init` ends in) is replaced by one that draws the parameter's
rows in blocks of `ROWS`, block b from a generator seeded by (run seed, parameter name, b), on the
CPU. A rank computes only the blocks that overlap its own rows (dim 0, where FSDP2 shards), so it
produces exactly its rows of the full tensor, and the result is the same on every device.

What this does not cover: random fills of tensors other than the parameters themselves (e.g.
`orthogonal_`, which draws a new matrix and copies it: under sharding it would differ by world size)
and buffers, which `to_empty` leaves uninitialised (a model on this path recomputes them or sets them
in `init_weights`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROWS = 64  # rows of a parameter drawn from one generator


def wants_meta_init(model: nn.Module) -> bool:
    """Does the model initialise itself in place (after `to_empty`)? Then it takes the meta path."""
    return callable(getattr(model, "init_weights", None))


def is_on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _local_rows(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's part of `param`, the global index of its first row along dim 0)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param, 0
    offset, rows = 0, param.shape[0]
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard() and placement.dim == 0:
            # torch.chunk's split, as FSDP2 and Shard(0) use: ceil(rows / n) rows per rank, the last short
            chunk = math.ceil(rows / param.device_mesh.size(mesh_dim))
            offset += param.device_mesh.get_local_rank(mesh_dim) * chunk
            rows = chunk
        elif placement.is_shard():
            raise NotImplementedError(f"row-seeded init: a parameter sharded on dim {placement.dim}")
    return param.to_local(), offset


def fill_rows(param: torch.Tensor, name: str, seed: int, draw: Callable[[torch.Tensor, torch.Generator], object]) -> None:
    """Fill this rank's rows of `param` with `draw(block, generator)` applied to each block of ROWS
    rows of the full tensor that they overlap (a CPU tensor), the generator seeded by (seed, name, b)."""
    local, offset = _local_rows(param)
    if local.dim() == 0:
        block = torch.empty((), dtype=local.dtype)
        draw(block, torch.Generator().manual_seed(block_seed(seed, name, 0)))
        local.copy_(block)
        return
    total, rows = param.shape[0], local.shape[0]
    for b in range(offset // ROWS, (offset + rows - 1) // ROWS + 1) if rows else ():
        start = b * ROWS
        block = torch.empty((min(ROWS, total - start), *param.shape[1:]), dtype=local.dtype)
        draw(block, torch.Generator().manual_seed(block_seed(seed, name, b)))
        lo, hi = max(offset, start), min(offset + rows, start + block.shape[0])
        local[lo - offset:hi - offset].copy_(block[lo - start:hi - start])


class RowSeeded(TorchDispatchMode):
    """Inside it, a random in-place fill of one of `names`' parameters draws by `fill_rows`. It works
    at the dispatcher, below `torch.nn.init` (whose fan-based scales it keeps) and above DTensor
    (whose shard it fills)."""

    aten = torch.ops.aten
    FILLS = {aten.normal_, aten.uniform_, aten.bernoulli_, aten.random_, aten.exponential_, aten.log_normal_,
             aten.cauchy_, aten.geometric_}

    def __init__(self, names: dict[int, str], seed: int):
        super().__init__()
        self.names, self.seed = names, seed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in self.FILLS and args and id(args[0]) in self.names:
            rest = args[1:]
            fill_rows(args[0], self.names[id(args[0])], self.seed,
                      lambda block, g: func(block, *rest, **{**kwargs, "generator": g}))
            return args[0]
        return func(*args, **kwargs)


@torch.no_grad()
def default_init(model: nn.Module) -> None:
    """The init of a model without `init_weights`, by module type: Linear and Embedding weights
    N(0, 0.02), biases 0, norm weights 1; any other module with parameters: its `reset_parameters`."""
    norms = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, norms):
            if getattr(module, "weight", None) is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif list(module.parameters(recurse=False)) and hasattr(module, "reset_parameters"):
            module.reset_parameters()


def materialize(model: nn.Module, device: torch.device, seed: int,
                init: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """Allocate a meta-device model (sharded or not) on `device` and initialise it in place, rows
    seeded by (seed, parameter name, row block); `init`: default the model's `init_weights`, else
    `default_init`. Returns the model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

    model.to_empty(device=device)
    # Names as the state dict spells them (activation checkpointing's wrapper leaves its prefix out
    # there): the weights must not depend on which blocks are wrapped.
    names = {id(p): n.replace(_CHECKPOINT_PREFIX, "") for n, p in model.named_parameters()}
    if init is None:
        init = (lambda m: m.init_weights()) if wants_meta_init(model) else default_init
    with torch.no_grad(), RowSeeded(names, seed):
        init(model)
    return model

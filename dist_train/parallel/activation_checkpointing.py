"""Activation checkpointing, applied from outside the model to its `blocks` (as torchtitan does).

A checkpointed block keeps less of its forward for backward and recomputes the rest there. Each mode
(`parallel.activation_checkpointing.mode`) is one class below that owns its options:

  none       nothing recomputed;
  full       every block keeps only its input and is recomputed whole in backward;
  selective  `every_n`: blocks i with i % n == 0 are recomputed whole, the others keep everything;
             `op`: every block keeps the outputs of its matmuls (`aten.mm`, `addmm`, `bmm`, the
             scaled-dot-product attention kernels) and recomputes only the cheap ops between them
             (norms, rotary embeddings, activations, residual adds): torch's
             `create_selective_checkpoint_contexts`. `save_matmuls: every_second` keeps every second
             matmul only (torchtitan's variant: less memory, one matmul in two recomputed).

Each block is wrapped in torch's `checkpoint_wrapper` (non-reentrant; the RNG state is replayed, so
dropout masks match), in place in whatever module holds it. The wrapper strips its prefix from
state-dict and DCP names, so checkpoints move between runs with and without it, and FSDP2 shards
the wrapped blocks as its units.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Callable, ClassVar, Optional

import torch
from torch import nn

# The matmul kernels whose outputs the per-op policy keeps (the expensive ops to recompute). The
# attention kernels are matched by prefix: each device has its own (`_scaled_dot_product_flash_
# attention_for_cpu`, `_efficient_attention`, `_cudnn_attention`, ...).
_MATMULS = ("mm", "addmm", "bmm", "baddbmm")
_ATTENTION_PREFIX = "_scaled_dot_product_"


def is_matmul(op) -> bool:
    """Is the aten overload `op` a matmul or a fused attention kernel (what `op` mode saves)?"""
    packet = getattr(op, "overloadpacket", op)
    name = getattr(packet, "__name__", str(packet))
    return getattr(packet, "_qualified_op_name", "").startswith("aten::") and (
        name in _MATMULS or name.startswith(_ATTENTION_PREFIX))


def matmul_policy(every_second: bool = False) -> Callable:
    """A fresh per-op policy for one block's forward: MUST_SAVE for matmuls (with `every_second`,
    only the 1st, 3rd, ... of the block), PREFER_RECOMPUTE for everything else.

    The count restarts for each forward (a fresh policy per checkpointed call) and is kept apart
    for the recomputation, so that backward replays exactly the choices forward made."""
    from torch.utils.checkpoint import CheckpointPolicy

    seen: Counter = Counter()

    def policy(ctx, op, *args, **kwargs):
        if not is_matmul(op):
            return CheckpointPolicy.PREFER_RECOMPUTE
        if not every_second:
            return CheckpointPolicy.MUST_SAVE
        key = "recompute" if ctx.is_recompute else "forward"
        seen[key] += 1
        return CheckpointPolicy.MUST_SAVE if seen[key] % 2 == 1 else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _selective_contexts(every_second: bool):
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(matmul_policy(every_second))


def checkpoint_block(block: nn.Module, context_fn: Optional[Callable] = None) -> nn.Module:
    """`block` inside torch's non-reentrant `checkpoint_wrapper` (with a per-op `context_fn`, if given)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    kwargs = {"context_fn": context_fn} if context_fn is not None else {}
    return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kwargs)


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` wherever `old` is a child inside `root` (a block may sit in a model's `blocks`, a
    stage's own list, or several lists at once)."""
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)


class CheckpointMode:
    """One value of `parallel.activation_checkpointing.mode`. `options` is that section (its
    `every_n`, `selective`, `save_matmuls`)."""

    name: ClassVar[str]
    # Does this mode recompute anything in backward (what DP-SGD and DIFF2 refuse)?
    recomputes: ClassVar[bool] = True

    def __init__(self, options) -> None:
        self.options = options

    def describe(self) -> str:
        return self.name

    def wraps(self, index: int) -> Optional[Callable[[nn.Module], nn.Module]]:
        """How block `index` (the model's own numbering) is wrapped, or None to leave it alone."""
        raise NotImplementedError

    def apply(self, root: nn.Module, blocks, first_index: int = 0) -> int:
        """Wrap each of `blocks` (numbered from `first_index`) inside `root`, in place; returns how many."""
        wrapped = 0
        for i, block in enumerate(list(blocks)):
            wrap = self.wraps(first_index + i)
            if wrap is not None:
                replace_module(root, block, wrap(block))
                wrapped += 1
        return wrapped


class NoCheckpointing(CheckpointMode):
    name = "none"
    recomputes = False

    def wraps(self, index: int):
        return None


class FullCheckpointing(CheckpointMode):
    name = "full"

    def wraps(self, index: int):
        return checkpoint_block


class SelectiveCheckpointing(CheckpointMode):
    name = "selective"

    def describe(self) -> str:
        o = self.options
        return f"selective every_n={o.every_n}" if o.selective == "every_n" else f"selective op ({o.save_matmuls} matmuls saved)"

    def wraps(self, index: int):
        o = self.options
        if o.selective == "every_n":
            return checkpoint_block if index % o.every_n == 0 else None
        context_fn = functools.partial(_selective_contexts, o.save_matmuls == "every_second")
        return functools.partial(checkpoint_block, context_fn=context_fn)


MODES: dict[str, type[CheckpointMode]] = {m.name: m for m in (NoCheckpointing, FullCheckpointing, SelectiveCheckpointing)}


def checkpoint_mode(options) -> CheckpointMode:
    """The mode `options` (the `parallel.activation_checkpointing` section) names."""
    return MODES[options.mode](options)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Full activation checkpointing of every `model.blocks[i]`, in place; returns `model`."""
    FullCheckpointing(None).apply(model, model.blocks)
    return model

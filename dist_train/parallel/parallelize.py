"""The model transforms a run applies before its backend wraps the model, in torchtitan's order:
activation checkpointing (`activation_checkpointing.py`), then `torch.compile` on each block
(`compile.py`), then (the backend's `setup`) DDP or FSDP2 around the compiled blocks.

The end-to-end loop, the local-learning stage builder and the benchmarks call `apply_model_transforms`;
nothing else reads the options it applies.
"""

from __future__ import annotations

from torch import nn

from dist_train.config.schema import Config
from dist_train.parallel.activation_checkpointing import checkpoint_mode
from dist_train.parallel.compile import check_compiler, compile_blocks, compile_seconds


def apply_model_transforms(model: nn.Module, cfg: Config, first_block: int = 0) -> nn.Module:
    """Transform `model`'s `blocks` in place as `cfg.parallel` says (their state-dict names
    unchanged); `first_block`: the model-wide index of `model.blocks[0]` (a local-learning stage's
    first block), which `selective` every_n counts by. Returns `model`.

    A missing C++ compiler for a compiled CPU run is a UserError here, before any step."""
    check_compiler(cfg)
    mode = checkpoint_mode(cfg.parallel.activation_checkpointing)
    if mode.recomputes:
        mode.apply(model, model.blocks, first_block)
    if cfg.parallel.compile:
        compile_blocks(model.blocks)  # the checkpoint wrappers, if any: the recomputation is compiled too
    return model


def transform_figures(cfg: Config) -> dict:
    """What the transforms add to a logged record: `compile_s`, this process's compile time so far
    (dynamo's own counters), when compiling."""
    return {"compile_s": round(compile_seconds(), 3)} if cfg.parallel.compile else {}

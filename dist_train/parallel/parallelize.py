"""The model transforms a run applies before its backend wraps the model, in torchtitan's order:
activation checkpointing, then (the backend's `setup`) DDP or FSDP2.

The end-to-end loop, the local-learning stage builder and the benchmarks call `apply_model_transforms`;
nothing else reads the options it applies.
"""

from __future__ import annotations

from torch import nn

from dist_train.config.schema import Config
from dist_train.parallel.activation_checkpointing import FullCheckpointing, NoCheckpointing


def apply_model_transforms(model: nn.Module, cfg: Config, first_block: int = 0) -> nn.Module:
    """Transform `model`'s `blocks` in place (their state-dict names unchanged) as `cfg.parallel`
    says; `first_block`: the model-wide index of `model.blocks[0]` (a local-learning stage's first
    block). Returns `model`."""
    mode = (FullCheckpointing if cfg.parallel.activation_checkpointing else NoCheckpointing)(None)
    mode.apply(model, model.blocks if mode.recomputes else (), first_block)
    return model

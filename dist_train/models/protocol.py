"""What each training feature needs of a model, checked before anything starts.

Every model maps a batch of inputs to outputs and has `loss(outputs, targets)` (a model built by a
factory without one gets mean cross-entropy). The rest is per feature:

- `blocks` (an `nn.ModuleList` of the repeated layers): activation checkpointing wraps each block,
  FSDP shards each block as its own unit (without `blocks` it shards the whole model as one unit:
  it runs, with the whole model gathered at once), and local-learning stages are cut between blocks;
- `embed` and `head` (modules run before and after the blocks): local-learning stages (the first
  stage runs `embed`, the last `head`);
- `num_flops_per_token(seq_len)` (optional): MFU in the logs; without it no MFU is reported.
"""

from __future__ import annotations

from torch import nn

from dist_train.errors import UserError


def _needs(cfg) -> list[tuple[str, str, str]]:
    """(attribute, what it must be, the feature that needs it as the config spells it)."""
    needs = []
    if cfg.parallel.stages > 1:
        feature = f"parallel.stages={cfg.parallel.stages}"
        needs += [("embed", "nn.Module", feature), ("blocks", "nn.ModuleList", feature), ("head", "nn.Module", feature)]
    if cfg.parallel.activation_checkpointing:
        needs.append(("blocks", "nn.ModuleList", "parallel.activation_checkpointing=true"))
    return needs


def check_model(model: nn.Module, cfg) -> None:
    """UserError naming the missing attribute and the feature, when `model` lacks what `cfg` uses."""
    kinds = {"nn.Module": nn.Module, "nn.ModuleList": nn.ModuleList}
    for attr, kind, feature in _needs(cfg):
        if not isinstance(getattr(model, attr, None), kinds[kind]):
            raise UserError(f"model: {cfg.model.name} has no `{attr}` ({kind}), which {feature} needs")
    if not callable(getattr(model, "loss", None)):
        raise UserError(f"model: {cfg.model.name} has no `loss(outputs, targets)`, which training needs")

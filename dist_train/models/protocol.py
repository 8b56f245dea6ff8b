"""What each training feature needs of a model, checked before anything starts.

Every model maps a batch of inputs to outputs and has `loss(outputs, targets)` (a model built by a
factory without one gets mean cross-entropy). The rest is per feature:

- `blocks` (an `nn.ModuleList` of the repeated layers): activation checkpointing wraps each block,
  `parallel.compile` compiles each block,
  FSDP shards each block as its own unit (without `blocks` it shards the whole model as one unit:
  it runs, with the whole model gathered at once), and local-learning stages are cut between blocks;
- `embed` and `head` (modules run before and after the blocks), `width` (the size of a block's
  output features) and `local_kind` (their layout: "gpt" for [B, T, width] token features, "mlp"
  for [B, width], "cnn" for [B, width, H, W] maps): local-learning stages (the first stage runs
  `embed`, the last `head`; the local methods size and shape their auxiliary heads by `width` and
  `local_kind`);
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
        needs += [("embed", "nn.Module", feature), ("blocks", "nn.ModuleList", feature), ("head", "nn.Module", feature),
                  ("width", "int", feature), ("local_kind", "'gpt', 'mlp' or 'cnn'", feature)]
    if cfg.parallel.activation_checkpointing.mode != "none":
        needs.append(("blocks", "nn.ModuleList", f"parallel.activation_checkpointing={cfg.parallel.activation_checkpointing.mode}"))
    if cfg.parallel.compile:
        needs.append(("blocks", "nn.ModuleList", "parallel.compile=true"))
    return needs


def check_model(model: nn.Module, cfg) -> None:
    """UserError naming the missing attribute and the feature, when `model` lacks what `cfg` uses."""
    # as the stage builder reads them: the model's own, else the config's (the built-in models)
    fallback = {"width": getattr(cfg.model.options(), "width", None), "local_kind": cfg.model.name}
    checks = {"nn.Module": lambda v: isinstance(v, nn.Module), "nn.ModuleList": lambda v: isinstance(v, nn.ModuleList),
              "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "'gpt', 'mlp' or 'cnn'": lambda v: v in ("gpt", "mlp", "cnn")}
    for attr, kind, feature in _needs(cfg):
        value = getattr(model, attr, None)
        if not checks[kind](value if value is not None else fallback.get(attr)):
            raise UserError(f"model: {cfg.model.name} has no `{attr}` ({kind}), which {feature} needs")
    if not callable(getattr(model, "loss", None)):
        raise UserError(f"model: {cfg.model.name} has no `loss(outputs, targets)`, which training needs")

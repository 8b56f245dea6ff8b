"""Which gradient transform a run's config asks for (see `dist_train.optim.transform`)."""

from __future__ import annotations

from dist_train.config.schema import Config
from dist_train.optim.transform import GradientTransform
from dist_train.registry import OPTIMIZERS


def build_transform(cfg: Config, data, ctx, model) -> GradientTransform:
    """The transform `optim.name` registers: the plain clip, DP-SGD around its base optimizer, or DIFF2."""
    return OPTIMIZERS.get(cfg.optim.name).build(cfg, data, ctx, model)

"""Which gradient transform a run's config asks for (see `dist_train.optim.transform`)."""

from __future__ import annotations

from dist_train.config.schema import Config
from dist_train.optim.transform import GradientTransform


def build_transform(cfg: Config, data, ctx, model) -> GradientTransform:
    """The plain clip, DP-SGD (optim.name dp_sgd) wrapped around the base optimizer, or DIFF2."""
    if cfg.optim.name == "dp_sgd":
        from dist_train.privacy.dp_sgd import DPSGD

        return DPSGD(cfg, data, ctx, model)
    if cfg.optim.name == "diff2":
        from dist_train.privacy.diff2_transform import Diff2Transform

        return Diff2Transform(cfg, data, ctx, model)
    return GradientTransform(cfg)

"""Data-parallel backends behind one interface (see base.Backend), registered by name in
`dist_train.registry.BACKENDS` (imported on first use: DeepSpeed and FairScale are heavy and
optional for the other backends)."""

from __future__ import annotations

from dist_train.config.schema import Config
from dist_train.parallel.base import Backend
from dist_train.registry import BACKENDS
from dist_train.runtime.dist import DistContext


def backend_class(name: str) -> type[Backend]:
    return BACKENDS.get(name)


def build_backend(cfg: Config, ctx: DistContext) -> Backend:
    return backend_class(cfg.parallel.backend)(cfg, ctx)


__all__ = ["BACKENDS", "Backend", "backend_class", "build_backend"]

"""Data-parallel backends behind one interface (see base.Backend)."""

from __future__ import annotations

from dist_train.config.schema import Config
from dist_train.parallel.base import Backend
from dist_train.runtime.dist import DistContext


def backend_class(name: str) -> type[Backend]:
    # Imported lazily: DeepSpeed and FairScale are heavy and optional for other backends.
    if name == "none":
        from dist_train.parallel.single import SingleProcess as cls
    elif name == "ddp":
        from dist_train.parallel.ddp import DDPBackend as cls
    elif name == "fsdp":
        from dist_train.parallel.fsdp import FSDPBackend as cls
    elif name == "deepspeed":
        from dist_train.parallel.deepspeed_backend import DeepSpeedBackend as cls
    elif name == "fairscale":
        from dist_train.parallel.fairscale_oss import FairScaleBackend as cls
    else:
        raise ValueError(name)
    return cls


def build_backend(cfg: Config, ctx: DistContext) -> Backend:
    return backend_class(cfg.parallel.backend)(cfg, ctx)


__all__ = ["Backend", "backend_class", "build_backend"]

"""Where a rank sits in a local-learning pipeline: a (stage x data-parallel) mesh.

Ranks [k*dp, (k+1)*dp) hold stage k; rank r's neighbours are r - dp and r + dp (same dp index), so
each data-parallel replica of the pipeline streams its own shard of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class StageLayout:
    stage: int
    num_stages: int
    dp_rank: int
    dp_size: int
    prev_rank: Optional[int]
    next_rank: Optional[int]

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def lead(self) -> bool:
        """The rank that logs for its stage."""
        return self.dp_rank == 0


def stage_layout(rank: int, world_size: int, num_stages: int) -> StageLayout:
    dp = world_size // num_stages
    stage, dp_rank = divmod(rank, dp)
    return StageLayout(stage=stage, num_stages=num_stages, dp_rank=dp_rank, dp_size=dp,
                       prev_rank=rank - dp if stage > 0 else None,
                       next_rank=rank + dp if stage < num_stages - 1 else None)


def check_pipeline(cfg, world_size: int) -> None:
    """The rules of any local-learning pipeline (parallel.stages > 1), whatever its method: raise
    UserError naming the key. The method's own rules are its `check`."""
    from dist_train.errors import UserError

    # A model without an n_layer key (one of one's own) has its blocks counted when it is built.
    stages, n_layer = cfg.parallel.stages, getattr(cfg.model.options(), "n_layer", None)
    if n_layer is not None and stages > n_layer:
        raise UserError(f"parallel.stages: {stages} stages but the model has only {n_layer} blocks (model.n_layer)")
    if world_size < stages:
        raise UserError(f"parallel.stages: {stages} stages need at least {stages} ranks, got {world_size} "
                        f"(launch with: dist-train launch <config> --nproc {stages}; or set parallel.stages=1)")
    if world_size % stages != 0:
        raise UserError(f"parallel.stages: {stages} stages do not divide the world size {world_size} "
                        "(each stage needs the same number of data-parallel ranks)")
    cuts = cfg.parallel.cut_points
    if cuts is not None and n_layer is not None and (len(cuts) != stages - 1 or
                                                     any(b <= a for a, b in zip([0, *cuts], [*cuts, n_layer]))):
        raise UserError(f"parallel.cut_points: {cuts} must be {stages - 1} strictly increasing block "
                        f"indices inside 1..{n_layer - 1}")


def check_replay(cfg, world_size: int) -> None:
    """Asynchronous mode's rules (checked after the method's own, which may refuse replay outright)."""
    from dist_train.errors import UserError

    stages = cfg.parallel.stages
    if cfg.local.asynchronous and world_size != stages:
        raise UserError("local.asynchronous: replay needs one rank per stage (replicas would replay "
                        "different batches and their gradient averaging would deadlock)")
    if cfg.local.asynchronous and cfg.train.grad_accum != 1:
        raise UserError("local.asynchronous: replay trains on whole batches; use train.grad_accum=1")

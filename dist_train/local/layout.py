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

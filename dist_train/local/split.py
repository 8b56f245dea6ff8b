"""Splitting a model into K contiguous, gradient-isolated stages.

Models are written as `embed` -> `blocks` -> `head`. Stage 0 owns the embedding and the first
blocks, the last stage owns the last blocks and the head; cut points are block indices. Balance is
by parameter count (a good proxy for a block's compute in these models) unless the user gives
explicit cut points.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from dist_train.errors import UserError


def balanced_cuts(block_costs: Sequence[float], stages: int) -> list[int]:
    """Start index of every stage after the first, so that the costliest stage is as cheap as possible.

    Exact for the small block counts of these models: a linear scan over the cost prefix sums,
    choosing each cut where the running total first reaches its share of the remainder.
    """
    n = len(block_costs)
    if stages > n:
        raise UserError(f"parallel.stages: {stages} stages but the model has only {n} blocks")
    cuts: list[int] = []
    start = 0
    for k in range(stages - 1):
        remaining_stages = stages - k
        remaining = sum(block_costs[start:])
        target = remaining / remaining_stages
        acc, end = 0.0, start
        # Leave at least one block for each later stage.
        limit = n - (remaining_stages - 1)
        while end < limit and (end == start or acc + block_costs[end] / 2 <= target):
            acc += block_costs[end]
            end += 1
        cuts.append(end)
        start = end
    return cuts


def check_cuts(cuts: Sequence[int], n_blocks: int, stages: int) -> list[int]:
    cuts = list(cuts)
    if len(cuts) != stages - 1:
        raise UserError(f"parallel.cut_points: {stages} stages need {stages - 1} cut points, got {len(cuts)}")
    if any(b <= a for a, b in zip([0, *cuts], [*cuts, n_blocks])):
        raise UserError(f"parallel.cut_points: {cuts} must be strictly increasing inside 1..{n_blocks - 1}")
    return cuts


def stage_block_ranges(model: nn.Module, stages: int, cuts: Optional[Sequence[int]] = None) -> list[range]:
    """The blocks of each stage: at `cuts` if given, else balanced by parameter count."""
    blocks = model.blocks
    if cuts is None:
        cuts = balanced_cuts([sum(p.numel() for p in b.parameters()) for b in blocks], stages)
    cuts = check_cuts(cuts, len(blocks), stages)
    bounds = [0, *cuts, len(blocks)]
    return [range(bounds[i], bounds[i + 1]) for i in range(stages)]


class Stage(nn.Module):
    """One stage of the main path: (embed if first) + its blocks + (head if last)."""

    def __init__(self, model: nn.Module, blocks: range, first: bool, last: bool):
        super().__init__()
        self.embed = model.embed if first else None
        self.blocks = nn.ModuleList(model.blocks[i] for i in blocks)
        self.head = model.head if last else None
        self.first, self.last = first, last

    def forward(self, x):
        h = self.embed(x) if self.embed is not None else x
        for block in self.blocks:
            h = block(h)
        return self.head(h) if self.head is not None else h


def split_model(model: nn.Module, stages: int, cuts: Optional[Sequence[int]] = None) -> list[Stage]:
    ranges = stage_block_ranges(model, stages, cuts)
    return [Stage(model, r, first=i == 0, last=i == stages - 1) for i, r in enumerate(ranges)]

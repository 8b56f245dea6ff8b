"""Batch production for the training loops: one owner for "the next step's micro-batches, on the device".

A step's batch is made in three moves, always in this order: the training sampler draws this rank's
examples for the step (`next_indices`: the data position advances), the gradient transform splits
them into micro-batches (`micro_batches`: DP-SGD's Poisson-sized physical batches), and the data set
reads each micro-batch (`get_batch`), which then goes to the device. The loops ask `StepBatches`
for step s and get a `StepBatch`; they never touch the sampler themselves.

The data position a checkpoint records is the one *consumed* by the loop: `state_dict` is the
sampler's state right after the draw of the last batch handed out, whatever was drawn since.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class StepBatch:
    """One step's data on this rank."""

    step: int
    indices: torch.Tensor  # this rank's examples (what the example-id audit logs)
    parts: list[torch.Tensor]  # the micro-batches' indices, as the transform split them (some may be empty)
    inputs: Optional[list[tuple[torch.Tensor, torch.Tensor]]]  # (x, y) per part, on the device; None: not read
    position: dict  # the sampler's state after this step's draw
    wait_s: float = 0.0  # seconds the loop waited for this batch (see `StepBatches.next`)


class StepBatches:
    def __init__(self, data, transform, sampler, device: torch.device, rank: int, world: int, reads: bool = True):
        """Batches of `data`'s training split: `sampler` (the transform's) draws this rank's slice
        (`rank` of `world` data-parallel ranks), `transform` splits it. `reads`: False for a pipeline
        stage that needs only the indices (everything it trains on comes from the stage before)."""
        self.data, self.transform, self.sampler = data, transform, sampler
        self.device, self.rank, self.world, self.reads = device, rank, world, reads
        self._consumed = dict(sampler.state_dict())

    # --- the data position ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The sampler's state after the last batch the loop took (what a resumed run continues from)."""
        return dict(self._consumed)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._consumed = dict(self.sampler.state_dict())

    # --- the steps ----------------------------------------------------------------------------
    def next(self, step: int) -> StepBatch:
        """Step `step`'s batch, on the device."""
        batch = self._produce(step)
        self._consumed = batch.position
        return batch

    def _produce(self, step: int) -> StepBatch:
        idx = self.sampler.next_indices(self.rank, self.world)
        position = dict(self.sampler.state_dict())
        # Right after the draw: DP-SGD's split reads the position of the draw it splits.
        parts = self.transform.micro_batches(idx)
        inputs = [self._read(part) for part in parts] if self.reads else None
        return StepBatch(step, idx, parts, inputs, position)

    def _read(self, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.get_batch("train", part)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    # --- the end ------------------------------------------------------------------------------
    def close(self) -> None:
        """Release what production holds (nothing, when batches are made inline)."""

    def __enter__(self) -> "StepBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

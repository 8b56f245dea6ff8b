"""Replay buffer for asynchronous local learning (after DGL's asynchronous variant, arXiv 1901.08164).

When a stage would otherwise sit idle waiting for the previous stage, it trains once more on a batch
it has already seen instead: the least-used one, ties broken by the freshest, each reused at most
`max_reuse` times. Uneven stages then stop stalling each other, at the price of some staleness,
which is measured (in upstream steps) and logged.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class _Entry:
    x: torch.Tensor
    y: torch.Tensor
    step: int
    uses: int = 1  # the fresh batch is trained on once when it arrives
    inp: Optional[torch.Tensor] = None  # the raw input too, for a stage that reads it (InfoPro)


class ReplayBuffer:
    def __init__(self, capacity: int, max_reuse: int):
        self.entries: collections.deque[_Entry] = collections.deque(maxlen=capacity)
        self.max_reuse = max_reuse
        self.newest = -1
        self.replays = 0
        self.staleness_sum = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, step: int, inp: Optional[torch.Tensor] = None) -> None:
        self.entries.append(_Entry(x, y, step, inp=inp))  # the link allocates fresh buffers per message
        self.newest = max(self.newest, step)

    def sample(self) -> Optional[tuple[torch.Tensor, torch.Tensor, int, Optional[torch.Tensor]]]:
        """(activation, targets, staleness, raw input or None) of the least-used entry still under
        the reuse cap (freshest on ties), or None."""
        usable = [e for e in self.entries if e.uses < self.max_reuse]
        if not usable:
            return None
        entry = min(usable, key=lambda e: (e.uses, -e.step))
        entry.uses += 1
        staleness = self.newest - entry.step
        self.replays += 1
        self.staleness_sum += staleness
        return entry.x, entry.y, staleness, entry.inp

    # Checkpointed with the trainer state (tensors, ints and lists only, so it loads weights-only).
    def state_dict(self) -> dict:
        return {"x": [e.x for e in self.entries], "y": [e.y for e in self.entries],
                "inp": [e.inp if e.inp is not None else torch.empty(0) for e in self.entries],
                "step": [e.step for e in self.entries], "uses": [e.uses for e in self.entries],
                "newest": self.newest, "replays": self.replays, "staleness_sum": self.staleness_sum}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.entries.clear()
        inputs = state.get("inp", [torch.empty(0)] * len(state["x"]))
        for x, y, step, uses, inp in zip(state["x"], state["y"], state["step"], state["uses"], inputs):
            self.entries.append(_Entry(x.to(device), y.to(device), step, uses,
                                       inp.to(device) if inp.numel() else None))
        self.newest, self.replays, self.staleness_sum = state["newest"], state["replays"], state["staleness_sum"]

    @property
    def max_uses(self) -> int:
        return max((e.uses for e in self.entries), default=0)

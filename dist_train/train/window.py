"""A logging window: the steps since the last logged record, and what the record reports of them."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch


@dataclass
class Window:
    """The training loss summed over the window's applied steps (a device tensor, read once at log
    time: a float() per step would sync the GPU), how many steps ran and how many were applied (a
    dropped non-finite step stays out of the mean), and time: the wall time since the window opened,
    the part of it spent working (`busy`) and the part spent waiting for the steps' batches
    (`data_wait`: from asking for a step's batch until it is on the device; see `train/batches.py`).

    What the records make of it:
      end-to-end  `step_time_s` = busy / steps, and busy *includes* the data wait (the batch is taken
                  inside the timed step), so `tokens_per_s` (batch tokens / step time) counts the time
                  a step waited for its data; `data_wait_s` = data_wait / steps and `data_wait_frac`
                  = data_wait / busy, the share of the step time spent waiting for data.
      a pipeline  the stage's wall time per step is elapsed / steps; the data wait is outside `busy`
      stage       (it is part of `idle_fraction`, with the wait for the previous stage), and
                  `data_wait_frac` = data_wait / elapsed.
    """

    device: torch.device
    loss: torch.Tensor = field(init=False)
    applied: int = field(init=False)
    steps: int = field(init=False)
    busy: float = field(init=False)
    data_wait: float = field(init=False)
    opened: float = field(init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Open the next window."""
        self.loss = torch.zeros((), device=self.device)
        self.applied, self.steps, self.busy, self.data_wait = 0, 0, 0.0, 0.0
        self.opened = time.perf_counter()

    def restart_clock(self) -> None:
        """Leave the time since the window opened out of it (a checkpoint save), keeping its steps."""
        self.opened = time.perf_counter()

    def add(self, step_loss: torch.Tensor, applied: bool) -> None:
        """One step done; its loss counts only if its update was applied."""
        self.steps += 1
        if applied:
            self.loss = self.loss + step_loss
            self.applied += 1

    def waited(self, seconds: float) -> None:
        """A step waited `seconds` for its batch."""
        self.data_wait += seconds

    def data_figures(self, step_time: float) -> dict:
        """`data_wait_s` (mean per step) and `data_wait_frac` (its share of `step_time`, the window's
        time per step as the record reports it)."""
        wait = self.data_wait / self.steps
        return {"data_wait_s": wait, "data_wait_frac": wait / step_time if step_time > 0 else None}

    @contextlib.contextmanager
    def working(self, sync: bool = False) -> Iterator[None]:
        """Time spent inside counts as busy. `sync`: on CUDA, wait for the device at both ends, so
        that the time is the GPU's work rather than how fast Python queued it."""
        cuda = sync and self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)  # work queued before must not be billed here
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            self.busy += time.perf_counter() - t0

    def mean_loss(self) -> Optional[float]:
        """The mean loss over the applied steps; None when every step was dropped."""
        return float(self.loss) / self.applied if self.applied else None

    def elapsed(self) -> float:
        """Wall time since the window opened (or its clock restarted)."""
        return time.perf_counter() - self.opened

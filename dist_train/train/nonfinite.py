"""`train.on_nonfinite`: a step whose loss or gradients are not finite never reaches the weights.

The guard sits between the gradient transform and the optimizer step (`Backend.step(..., accept=)`).
Its verdict must be the same on every replica, or the replicas' weights drift apart: the gradient
norm is already the same everywhere (it is taken over reduced gradients), while each replica's own
loss is not, so a one-element max-reduce over the replica group joins the two. Policies:

- `skip`: the update is dropped (gradients zeroed), the step is counted in `nonfinite_skipped` and
  training goes on with the next batch, as torch's GradScaler does for an overflowing fp16 step.
- `stop`: the update is dropped too, and the run asks every rank to stop (`StopVote`): a checkpoint
  of the last good weights is committed and the job ends with a message naming the step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from dist_train.runtime.dist import DistContext


class NonFiniteGuard:
    def __init__(self, policy: str, ctx: DistContext, group=None, group_size: Optional[int] = None):
        """`group`: the replicas that must agree (default: the world); `group_size` its size."""
        self.policy = policy
        self.ctx = ctx
        self.group = group
        self.group_size = ctx.world_size if group_size is None else group_size
        self.skipped = 0  # steps whose update was dropped, over the run (resumed from the checkpoint)
        self.first_bad_step: Optional[int] = None
        self.stop_requested = False
        self._bad = torch.zeros((), dtype=torch.bool, device=ctx.device)

    def observe(self, loss: torch.Tensor) -> None:
        """Note one micro-batch's loss (no sync: read once per step in `accept`)."""
        self._bad |= ~torch.isfinite(loss.detach()).all()

    def accept(self, step: int, grad_norm: Optional[float]) -> bool:
        """The verdict for step `step` (0-based) given the transform's gradient norm (None: unknown
        before the optimizer runs, as with DeepSpeed's engine): True applies the update."""
        bad = float(self._bad)
        self._bad.zero_()
        if self.ctx.distributed and self.group_size > 1:
            bad = self.ctx.all_reduce_sum([bad], group=self.group)[0]
        if grad_norm is not None and not math.isfinite(grad_norm):
            bad = 1.0
        if not bad:
            return True
        self.skipped += 1
        if self.first_bad_step is None:
            self.first_bad_step = step + 1
        if self.policy == "stop":
            self.stop_requested = True
        return False

    def metrics(self) -> dict:
        return {"nonfinite_skipped": self.skipped}

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state:
            self.skipped = int(state.get("skipped", 0))

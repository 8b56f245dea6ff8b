"""Stopping a distributed run cleanly: every rank stops after the same step and saves.

A stop can start on one rank (a non-finite step under `train.on_nonfinite=stop`) or on all of them
at slightly different moments (SIGTERM from the launcher or Slurm, SIGUSR1 from Slurm's
`--signal` before a preemption). Ranks that stopped at different steps would save an inconsistent
cut and hang in the save's barrier, so the decision is a vote: after every step each rank posts its
flags in an asynchronous max-reduce on the control group, and the vote posted after step s is read
before step s + lag, which is then the last step. Every rank reads the same votes, so every rank
stops after the same step. The
lag lets a pipeline stage that runs ahead of the last one (by up to `local.max_in_flight`
messages) never wait for the vote; in lockstep data-parallel loops a lag of 2 hides its latency
behind a whole step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections import deque
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from dist_train.runtime.dist import DistContext

PREEMPT, NONFINITE = 0, 1  # flag slots
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPT_EXIT = 128 + signal.SIGTERM  # what a terminated process reports; the launcher passes it on


class StopVote:
    def __init__(self, ctx: DistContext, lag: int = 1):
        self.ctx = ctx
        # Alone there is nothing to wait for: the flags posted after the previous step decide.
        self.lag = max(1, lag) if ctx.distributed and ctx.world_size > 1 else 1
        self.signal_name: Optional[str] = None  # set from the signal handler (preemption)
        self.nonfinite_step = 0  # the first non-finite step this rank saw under on_nonfinite=stop
        self._pending: deque = deque()
        self._group = getattr(ctx, "control_group", None)

    def request_preemption(self, name: str) -> None:
        self.signal_name = self.signal_name or name

    def _flags(self) -> torch.Tensor:
        return torch.tensor([1.0 if self.signal_name else 0.0, float(self.nonfinite_step)])

    def post(self) -> None:
        """After every step: this rank's flags into the vote."""
        flags = self._flags()
        if not self.ctx.distributed or self.ctx.world_size == 1:
            self._pending.append((None, flags))
            return
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending.append((work, flags))

    def last_step(self) -> Optional[torch.Tensor]:
        """Before a step: the flags voted `lag` steps ago, when some is set (this step is then the
        last one; knowing it before the step lets a pipeline stage not post a receive for the next)."""
        if len(self._pending) < self.lag:
            return None
        work, decided = self._pending.popleft()
        if work is not None:
            work.wait()
        return decided if decided.any() else None

    def drain(self) -> None:
        """Wait for the votes still in flight (every rank posted the same number)."""
        while self._pending:
            work, _ = self._pending.popleft()
            if work is not None:
                work.wait()

    def describe(self, decided: torch.Tensor) -> str:
        if decided[NONFINITE]:
            return (f"non-finite loss or gradients at step {int(decided[NONFINITE])} (train.on_nonfinite=stop); "
                    f"that update was not applied")
        return f"stopped by {self.signal_name or 'a signal to another rank'} (preemption)"


@contextlib.contextmanager
def stop_signals(vote: StopVote) -> Iterator[None]:
    """SIGTERM / SIGUSR1 ask the vote to stop; a second one ends the process at once (the user
    meant it). Only the main thread can own signal handlers; elsewhere this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        if vote.signal_name is not None:  # the second signal: no more patience
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        vote.request_preemption(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

"""What both training loops do around each step to survive faults, in one object.

- before a step: is this the last one? (a stop vote: preemption signal, `train.on_nonfinite=stop`)
- around the update: the non-finite guard's verdict (`accept`), and injected faults (`runtime.faults`)
- after a step: post this rank's vote, log the example ids it trained on (`telemetry.sample_ids`),
  fire an injected kill or stop.

The loops stay readable top to bottom; the policies live in `nonfinite.py` and `stopping.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from dist_train.config.schema import Config
from dist_train.runtime import faults
from dist_train.runtime.dist import DistContext
from dist_train.telemetry import MetricsWriter
from dist_train.train.nonfinite import NonFiniteGuard
from dist_train.train.stopping import PREEMPT, PREEMPT_EXIT, StopVote, stop_signals

SAMPLES_DIR = "samples"
ATTEMPTS_FILE = "attempts.jsonl"
NONFINITE_EXIT = 1


class RunControl:
    def __init__(self, cfg: Config, ctx: DistContext, run_dir: Path, rank: int, lag: int,
                 replica_group=None, replicas: Optional[int] = None):
        """`rank`: names this rank's sample-id log; `replica_group`/`replicas`: the ranks holding the
        same weights, which must agree on every skipped step (default: the world)."""
        faults.check()  # a malformed fault list is bad input, before anything runs
        self.guard = NonFiniteGuard(cfg.train.on_nonfinite, ctx, replica_group, replicas)
        self.vote = StopVote(ctx, lag)
        self.samples = MetricsWriter(run_dir / SAMPLES_DIR / f"rank{rank}", enabled=cfg.telemetry.sample_ids,
                                     tensorboard=False)
        self.ctx = ctx
        self.run_dir = run_dir
        self.reason: Optional[str] = None  # why the run stopped early, once it has
        self.exit_code = 0
        self.applied = True  # the last step's verdict: False when its update was dropped

    # --- resume ---------------------------------------------------------------------------
    def resume(self, start: int, saved: Optional[dict]) -> None:
        """Forget ids logged after the checkpoint (their updates were lost) and restore counters."""
        self.samples.truncate_from(start + 1)
        self.guard.load_state_dict((saved or {}).get("nonfinite"))

    def started(self, start: int, resume_from: Optional[Path]) -> None:
        """Training is about to run its first step: note the attempt in `attempts.jsonl` (rank 0).

        One line per start of the job (a restart by the launcher's agent, a relaunch after a
        preemption): when it began training, from which step and checkpoint. A run's history of
        faults and recoveries is then in its own folder.
        """
        if self.ctx.is_main:
            # The launcher's restart count: the elastic agent's, or Slurm's requeue count.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT") or "0"
            record = {"attempt": int(attempt), "start_step": start,
                      "resumed_from": str(resume_from) if resume_from else None, "time": time.time()}
            with open(self.run_dir / ATTEMPTS_FILE, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def state_dict(self) -> dict:
        return {"nonfinite": self.guard.state_dict()}

    # --- the step -------------------------------------------------------------------------
    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        with stop_signals(self.vote):
            yield

    def last_step(self) -> bool:
        """Before a step: True when the vote says this step is the run's last."""
        decided = self.vote.last_step()
        if decided is None:
            return False
        self.reason = self.vote.describe(decided)
        self.exit_code = PREEMPT_EXIT if decided[PREEMPT] else NONFINITE_EXIT
        return True

    @staticmethod
    def poison(loss: torch.Tensor, step: int) -> torch.Tensor:
        """A micro-batch's loss of step `step` (0-based), before its backward: NaN where an injected
        `nan` fault says so (`runtime.faults`), else unchanged."""
        return faults.poison(loss, step + 1)

    def observe(self, loss: torch.Tensor) -> torch.Tensor:
        """A non-empty micro-batch's loss, watched by the guard (an empty one has no loss to judge)."""
        self.guard.observe(loss)
        return loss

    def accept(self, step: int) -> Callable[[Optional[float]], bool]:
        def verdict(norm: Optional[float]) -> bool:
            ok = self.applied = self.guard.accept(step, norm)
            if self.guard.stop_requested:
                self.vote.nonfinite_step = self.guard.first_bad_step
            return ok
        return verdict

    def end_step(self, done: int, indices: torch.Tensor) -> None:
        self.vote.post()
        self.samples.log(done, {"ids": indices.tolist()})
        faults.at("step", done)

    def metrics(self) -> dict:
        return self.guard.metrics()

    def finish(self) -> None:
        self.vote.drain()
        self.samples.close()

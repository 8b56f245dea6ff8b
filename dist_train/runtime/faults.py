"""Fault injection for the reliability tests and `dist-train bench soak`: real faults, on cue.

`DIST_TRAIN_FAULT` lists faults separated by ";", each `KIND@step=S[,rank=R][,attempt=A][,seconds=N]`:

- `kill`: SIGKILL this process right after step S's update (before that step's log and checkpoint);
- `stop`: SIGSTOP this process there (a hung peer: it holds its sockets and answers nothing);
- `kill_in_save`: SIGKILL while saving the checkpoint of step S, after this rank's shard is on disk
  and before the commit marker;
- `nan`: make this rank's loss of step S not finite (before its backward);
- `kill_in_async_write`: SIGKILL inside the background write of step S's checkpoint
  (`checkpoint.async`), after this rank's shards are written and before the save completes, while
  training goes on;
- `slow_async_write`: make that background write last `seconds` (default 2) longer.

`rank` defaults to 0 and `seconds` (`slow_async_write` only) to 2; `attempt` (default 0) is the restart count of the elastic agent
(TORCHELASTIC_RESTART_COUNT), so a fault fires in the first run and not again after the restart —
`attempt=1` fires in the second. The faults are real (the signals are the ones the kernel would
deliver); only their timing is chosen, so that a test can name the step it expects to lose.
With `DIST_TRAIN_FAULT_LOG` set, each fault appends itself and its wall time to that file first.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from dist_train.errors import UserError

FAULT_ENV = "DIST_TRAIN_FAULT"
FAULT_LOG_ENV = "DIST_TRAIN_FAULT_LOG"
KINDS = ("kill", "stop", "kill_in_save", "nan", "kill_in_async_write", "slow_async_write")
# The point of the run where each kind fires (`at`).
_POINTS = {"step": ("kill", "stop"), "save": ("kill_in_save",),
           "async_write": ("kill_in_async_write", "slow_async_write")}


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int = 0
    attempt: int = 0
    seconds: int = 2


def parse(text: str) -> tuple[Fault, ...]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, args = item.partition("@")
        if kind not in KINDS:
            raise UserError(f"{FAULT_ENV}: unknown fault {kind!r} in {item!r} (one of {', '.join(KINDS)})")
        fields = {}
        for pair in filter(None, args.split(",")):
            key, _, value = pair.partition("=")
            if key not in ("step", "rank", "attempt", "seconds") or not value.strip().isdigit():
                raise UserError(f"{FAULT_ENV}: {pair!r} in {item!r} is not step=N, rank=N, attempt=N or seconds=N")
            fields[key] = int(value)
        if "step" not in fields:
            raise UserError(f"{FAULT_ENV}: {item!r} names no step (KIND@step=S[,rank=R][,attempt=A])")
        faults.append(Fault(kind, **fields))
    return tuple(faults)


@lru_cache(maxsize=None)
def _planned(text: str, rank: int, attempt: int) -> dict[tuple[str, int], Fault]:
    return {(f.kind, f.step): f for f in parse(text) if f.rank == rank and f.attempt == attempt}


def _mine() -> dict[tuple[str, int], Fault]:
    text = os.environ.get(FAULT_ENV, "")
    if not text:
        return {}
    rank = int(os.environ.get("RANK", "0"))
    return _planned(text, rank, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))


def check() -> None:
    """Reject a malformed fault list before training starts (one line, exit 2)."""
    _mine()


def at(point: str, step: int) -> None:
    """Fire this rank's faults of `step` at `point`: `kill` / `stop` ("step"), `kill_in_save`
    ("save"), `kill_in_async_write` / `slow_async_write` ("async_write")."""
    faults = _mine()
    if not faults:
        return
    for kind in _POINTS[point]:
        if (kind, step) in faults:
            _record(faults[(kind, step)])
            if kind == "slow_async_write":
                time.sleep(faults[(kind, step)].seconds)
            else:
                os.kill(os.getpid(), signal.SIGSTOP if kind == "stop" else signal.SIGKILL)


def _record(fault: Fault) -> None:
    """Append the fault and its wall time to `DIST_TRAIN_FAULT_LOG` (for `bench soak`'s recovery times)."""
    path = os.environ.get(FAULT_LOG_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({**asdict(fault), "time": time.time()}) + "\n")


def poison(loss: torch.Tensor, step: int) -> torch.Tensor:
    """`loss` (of step `step`, 1-based) made NaN when a `nan` fault names it."""
    if ("nan", step) in _mine():
        return loss * float("nan")
    return loss

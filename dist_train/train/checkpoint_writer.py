"""How a checkpoint's shards reach the disk: the writer strategy of the `Checkpointer`.

A writer gets the folder, the backend and a `commit` callback from the `Checkpointer`, which owns the
folder's life (prepare it, the trainer-state files, the COMMITTED marker, pruning). The writer calls
`commit` once every rank's shards are on disk, and never before: the marker is what resume trusts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from dist_train.parallel.base import Backend
from dist_train.runtime import faults
from dist_train.runtime.dist import DistContext

Commit = Callable[[int, Path], None]


class SyncWriter:
    """The backend writes its shards (DCP, or its own format) before the call returns; the barrier
    after it tells rank 0 that every rank's files are on disk, and the commit follows at once."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx

    def write(self, step: int, path: Path, backend: Backend, commit: Commit) -> None:
        backend.save(str(path))
        faults.at("save", step)  # the reliability tests' kill between a shard and its commit
        self.ctx.barrier()  # every rank's shard is on disk before the marker says so
        commit(step, path)
        self.ctx.barrier()  # and no rank goes on before it is committed

    def wait(self) -> None:
        """Nothing is ever in flight."""

    def close(self) -> None:
        pass

"""How a checkpoint's shards reach the disk: written in place (`SyncWriter`), or staged to host memory
and written in the background while training goes on (`AsyncWriter`, `checkpoint.async`).

A writer gets the folder, the backend and a `commit` callback from the `Checkpointer`, which owns the
folder's life (prepare it, the trainer-state files, the COMMITTED marker, pruning). The writer calls
`commit` once every rank's shards are on disk, and never before: the marker is what resume trusts.
"""

from __future__ import annotations

import functools
import threading
import time
import warnings
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import torch

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


@functools.lru_cache(maxsize=None)
def _fault_point_writer() -> type:
    """DCP's file-system writer with the injected faults of the background write
    (`kill_in_async_write`, `slow_async_write`) after this rank's files are written and before DCP
    gathers every rank's results: the folder then holds this rank's shards and no marker."""
    from torch.distributed.checkpoint import FileSystemWriter

    class FaultPointWriter(FileSystemWriter):
        def __init__(self, path: Path, step: int):
            super().__init__(str(path))
            self.step = step

        def write_data(self, plan, planner):
            written = super().write_data(plan, planner)
            written.wait()
            faults.at("async_write", self.step)
            return written

    return FaultPointWriter


class AsyncWriter:
    """`checkpoint.async`: DCP's `async_save` copies the backend's state dict to host memory (pinned
    on CUDA) in the caller, then plans and writes it in a background thread over a gloo group of its
    own, made once by every rank, so that its collectives never order against training's. The
    training loop waits only for the copy, and for the previous save if it is still being written:
    at most one save is in flight, since the staging buffers are reused from one save to the next.

    When is a save complete on every rank? DCP's save ends with a gather of every rank's write
    results to its coordinator (rank 0 of the group, the run's rank 0), which then writes the
    checkpoint's metadata and broadcasts the outcome: a failed rank makes it raise on every rank.
    So when rank 0's future completes without error, every rank's shards are on disk (and, written
    before its `async_save` began, its trainer-state file): rank 0 commits from the future's
    completion with no collective of its own, which could not run beside training anyway.
    """

    def __init__(self, ctx: DistContext, timeout_s: float):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.ctx = ctx
        self.group = None
        if ctx.distributed:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        else:  # DCP warns that it assumes one process, which is exactly the run's case
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        cuda = ctx.device.type == "cuda"
        # Synchronous staging (the copy is done when `async_save` returns: the weights may change
        # right after); on CUDA into pinned buffers with non-blocking copies, then one device sync.
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                   use_async_staging=False, use_non_blocking_copy=cuda))
        self._done: Optional[Future] = None  # the in-flight save: its write and commit
        self.in_flight = 0  # saves started and not yet committed (at most one)
        self._lock = threading.Lock()
        self.waited_s = 0.0  # the last save's wait for the previous one

    def write(self, step: int, path: Path, backend: Backend, commit: Commit) -> None:
        import torch.distributed.checkpoint as dcp

        self.wait()
        done: Future = Future()
        with self._lock:
            self.in_flight += 1
            assert self.in_flight == 1, "two checkpoint saves in flight"
        try:
            written = dcp.async_save(backend.checkpoint_state(), storage_writer=_fault_point_writer()(path, step),
                                     process_group=self.group, async_stager=self.stager,
                                     no_dist=self.group is None)
        except BaseException:
            with self._lock:
                self.in_flight -= 1
            raise
        written.add_done_callback(lambda f: self._finished(f, step, path, commit, done))
        self._done = done

    def _finished(self, written: Future, step: int, path: Path, commit: Commit, done: Future) -> None:
        """In the writing thread, once DCP's save has returned on this rank: commit (rank 0)."""
        try:
            written.result()
            commit(step, path)
        except BaseException as e:  # handed to the training loop's next wait
            done.set_exception(RuntimeError(f"checkpoint {path}: the background write failed: {e}"))
        else:
            done.set_result(None)
        finally:
            with self._lock:
                self.in_flight -= 1

    def wait(self) -> None:
        """Until the in-flight save (if any) is written and committed; its error, if it failed."""
        done, self._done = self._done, None
        t0 = time.perf_counter()
        if done is not None:
            done.result()
        self.waited_s = time.perf_counter() - t0

    def close(self) -> None:
        """After the run's last wait: free the staging buffers."""
        self.stager.close()


def build_writer(cfg, ctx: DistContext):
    """The writer `checkpoint.async` asks for (collective when async: it makes the writer's group)."""
    if cfg.checkpoint.async_:
        return AsyncWriter(ctx, cfg.runtime.save_timeout_s)
    return SyncWriter(ctx)

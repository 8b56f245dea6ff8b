"""Batch production for the training loops: one owner for "the next step's micro-batches, on the device".

A step's batch is made in three moves, always in this order: the training sampler draws this rank's
examples for the step (`next_indices`: the data position advances), the gradient transform splits
them into micro-batches (`micro_batches`: DP-SGD's Poisson-sized physical batches), and the data set
reads each micro-batch (`get_batch`), which then goes to the device. The loops ask `StepBatches`
for step s and get a `StepBatch`; they never touch the sampler themselves.

Prefetching (`data.prefetch`, on by default): when the loop takes step s's batch, step s+1's is
started at once on one background thread, so it is made while step s computes; exactly one step
ahead, never past the run's last step. A thread rather than a `DataLoader` with worker processes:
the samplers are pure functions of (seed, step) whose split may depend on the draw just made
(DP-SGD's lock-step count of micro-batches reads the sampler's position), and the reading itself is
a gather over tensors or a memory-mapped file that releases the GIL; workers would need the sampler
and transform pickled into each process and would reorder nothing we need reordered. Every draw is
still made in step order by the same code, so the batches, and every number a run computes from
them, are the same with and without prefetching. On CUDA the thread copies each batch into pinned
host memory and on to the device with `non_blocking=True` on a stream of its own; the loop's stream
uses it only after the copy's event (`StepBatch.ready`) completed.

The data position a checkpoint records is the one *consumed* by the loop: `state_dict` is the
sampler's state right after the draw of the last batch handed out, whatever was drawn since, so a
resumed run draws exactly the batches an uninterrupted one would.

`StepBatch.wait_s` is the data wait: the time `next` spent between being asked for a step's batch
and having it on the device (waiting for the prefetch and the device copy; without prefetching,
the whole production). Data sets' `get_batch` must be a pure function of the indices (no draw from
torch's global generator): it runs on the thread.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch

THREAD_NAME = "dist-train-prefetch"


@dataclass
class StepBatch:
    """One step's data on this rank."""

    step: int
    indices: torch.Tensor  # this rank's examples (what the example-id audit logs)
    parts: list[torch.Tensor]  # the micro-batches' indices, as the transform split them (some may be empty)
    inputs: Optional[list[tuple[torch.Tensor, torch.Tensor]]]  # (x, y) per part, on the device; None: not read
    position: dict  # the sampler's state after this step's draw
    ready: Any = None  # CUDA prefetch: the event of the copies to the device
    wait_s: float = 0.0  # seconds the loop waited for this batch (see `StepBatches.next`)

    def tensors(self) -> list[torch.Tensor]:
        return [t for xy in self.inputs or () for t in xy]


class StepBatches:
    def __init__(self, data, transform, sampler, device: torch.device, rank: int, world: int, steps: int,
                 reads: bool = True, prefetch: bool = False):
        """Batches of `data`'s training split: `sampler` (the transform's) draws this rank's slice
        (`rank` of `world` data-parallel ranks), `transform` splits it; `steps`: the run's number of
        steps (nothing is drawn for a step beyond it). `reads`: False for a pipeline stage that needs
        only the indices (everything it trains on comes from the stage before). `prefetch`: make step
        s+1's batch on a background thread while step s runs."""
        self.data, self.transform, self.sampler = data, transform, sampler
        self.device, self.rank, self.world, self.reads = device, rank, world, reads
        self.steps, self.prefetch = steps, prefetch
        self._consumed = dict(sampler.state_dict())
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[tuple[int, Future]] = None  # (step, its batch in the making)
        self._stream = torch.cuda.Stream(device) if prefetch and device.type == "cuda" else None

    # --- the data position ------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The sampler's state after the last batch the loop took (what a resumed run continues from)."""
        return dict(self._consumed)

    def load_state_dict(self, state: dict) -> None:
        self._discard()
        self.sampler.load_state_dict(state)
        self._consumed = dict(self.sampler.state_dict())

    # --- the steps ----------------------------------------------------------------------------
    def next(self, step: int) -> StepBatch:
        """Step `step`'s batch, on the device (its `wait_s` set); with prefetching, step+1's is started."""
        t0 = time.perf_counter()
        if self._pending is not None and self._pending[0] == step:
            batch = self._pending[1].result()  # a failure while making it is raised here
            self._pending = None
        else:  # the first step (or a step the prefetch did not guess): made here
            self._discard()
            batch = self._produce(step)
        if batch.ready is not None:
            batch.ready.synchronize()
            current = torch.cuda.current_stream(self.device)
            for t in batch.tensors():  # used on the loop's stream: not to be reused before it is done
                t.record_stream(current)
        batch.wait_s = time.perf_counter() - t0
        self._consumed = batch.position
        if self.prefetch and step + 1 < self.steps:
            self._pending = (step + 1, self._executor().submit(self._produce, step + 1))
        return batch

    def _produce(self, step: int) -> StepBatch:
        idx = self.sampler.next_indices(self.rank, self.world)
        position = dict(self.sampler.state_dict())
        # Right after the draw: DP-SGD's split reads the position of the draw it splits.
        parts = self.transform.micro_batches(idx)
        if not self.reads:
            return StepBatch(step, idx, parts, None, position)
        if self._stream is None:
            return StepBatch(step, idx, parts, [self._read(part) for part in parts], position)
        with torch.cuda.stream(self._stream):
            inputs = [self._read(part, pin=True) for part in parts]
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return StepBatch(step, idx, parts, inputs, position, ready)

    def _read(self, part: torch.Tensor, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.get_batch("train", part)
        if pin:  # a copy from pinned memory is asynchronous; from pageable memory it is staged and waited for
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            threads = torch.get_num_threads()
            device = self.device

            def init() -> None:
                torch.set_num_threads(threads)  # as the loop's thread (runtime.threads)
                if device.type == "cuda":
                    torch.cuda.set_device(device)  # the current device is per thread

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME, initializer=init)
        return self._pool

    def _discard(self) -> None:
        """Drop the batch in the making (waiting for it) and put the sampler back where the loop is."""
        if self._pending is None:
            return
        _, future = self._pending
        self._pending = None
        if not future.cancel():
            future.exception()  # wait; what went wrong with a batch nobody takes does not matter
        self.sampler.load_state_dict(self._consumed)

    # --- the end ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the thread: the batch in the making is waited for and dropped. Called at the end of
        the run, on an early stop and on an exception (the loops hold this as a context manager)."""
        self._discard()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "StepBatches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

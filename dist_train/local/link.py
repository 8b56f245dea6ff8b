"""Point-to-point link between neighbouring stages: activations and targets go forward, nothing back.

Sends are non-blocking with a bounded number in flight (back-pressure: a fast stage blocks once it
is `max_in_flight` messages ahead instead of queueing without limit). The receive for the next
message is posted as soon as the current one is taken, so communication overlaps compute.
The one backward message is opt-in: MAN's weights (never gradients), sent every few steps.
`InProcessLink` (`inprocess_link.py`) is the same interface between stages in one process.
Every tensor that crosses is a detached leaf — `sent_requires_grad` counts any that is not, so
a test can prove that no gradient or autograd graph ever spans two ranks.
"""

from __future__ import annotations

import collections
import threading
from typing import Optional

import torch
import torch.distributed as dist

TRAIN_TAG, EVAL_TAG, SHAPE_TAG, WEIGHT_TAG, GEN_TAG, STATS_TAG = 0, 1, 2, 3, 4, 5
_MAX_DIMS = 8


class _Pending:
    """Receives in flight, with a completion flag that can be read without blocking.

    `Work.is_completed()` is not reliable for gloo's point-to-point work (it stays False until
    `wait()` is called), so a short-lived thread waits (torch releases the GIL there) and sets an
    event; `done()` then answers truthfully on gloo and NCCL alike.
    """

    def __init__(self, works: list, buffers: tuple):
        self.works, self.buffers = works, buffers
        self._event = threading.Event()
        self._error: Optional[BaseException] = None
        threading.Thread(target=self._wait_all, daemon=True).start()

    def _wait_all(self) -> None:
        try:
            for work in self.works:
                work.wait()
        except BaseException as e:  # surfaced to the caller in wait()
            self._error = e
        self._event.set()

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self) -> tuple:
        self._event.wait()
        if self._error is not None:
            raise self._error
        return self.buffers


class StageLink:
    """`send_targets=False` (training traffic only): every stage reads its own targets from the
    deterministic sampler, so only activations cross, and no step header either: messages between
    one pair of ranks on one tag arrive in the order they were sent (torch.distributed's p2p
    guarantee), which is what the header checked. Evaluation messages always carry targets."""

    def __init__(self, prev_rank: Optional[int], next_rank: Optional[int], device: torch.device,
                 max_in_flight: int = 2, send_targets: bool = True):
        self.prev, self.next = prev_rank, next_rank
        self.device = device
        self.max_in_flight = max_in_flight
        self._with_targets = {TRAIN_TAG: send_targets, EVAL_TAG: True}
        self._in_flight: collections.deque = collections.deque()
        self._posted: dict[int, tuple] = {}
        self._shapes_sent: set[int] = set()
        self._shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # tag -> (act, targets)
        self.bytes_sent = 0
        self.tensors_sent = 0
        self.sent_requires_grad = 0
        self.weight_bytes_sent = 0
        self._weights_out: list = []
        self._weights_in: Optional[tuple] = None

    # -- shapes are exchanged once per tag (training micro-batches and evaluation batches differ),
    # so receive buffers can be allocated ahead of time ---------------------------------------
    def _send_shapes(self, act: torch.Tensor, tgt: torch.Tensor, tag: int) -> None:
        header = torch.zeros(2 * _MAX_DIMS + 3, dtype=torch.int64)
        header[0], header[1], header[2] = tag, act.dim(), tgt.dim()
        header[3:3 + act.dim()] = torch.tensor(act.shape)
        header[3 + _MAX_DIMS:3 + _MAX_DIMS + tgt.dim()] = torch.tensor(tgt.shape)
        dist.send(header.to(self.device), self.next, tag=SHAPE_TAG)
        self._shapes_sent.add(tag)

    def _recv_shapes(self, tag: int) -> None:
        header = torch.zeros(2 * _MAX_DIMS + 3, dtype=torch.int64, device=self.device)
        dist.recv(header, self.prev, tag=SHAPE_TAG)
        header = header.cpu().tolist()
        if header[0] != tag:  # both sides open tags in the same order (train before eval)
            raise RuntimeError(f"stage link: expected the shapes of tag {tag}, got tag {header[0]}")
        self._shapes[tag] = (tuple(header[3:3 + header[1]]),
                             tuple(header[3 + _MAX_DIMS:3 + _MAX_DIMS + header[2]]))

    # -- forward traffic ---------------------------------------------------------------------
    def send(self, act: torch.Tensor, tgt: torch.Tensor, step: int, tag: int = TRAIN_TAG) -> None:
        """Send the activation (and, on this tag, [step] + targets) to the next stage without waiting."""
        if act.requires_grad or act.grad_fn is not None:
            self.sent_requires_grad += 1
        if tag not in self._shapes_sent:
            self._send_shapes(act, tgt, tag)
        act = act.detach().float().contiguous()
        buffers = [act]
        if self._with_targets[tag]:
            buffers.append(torch.cat([torch.tensor([step], dtype=torch.int64, device=tgt.device),
                                      tgt.reshape(-1).long()]))
        while len(self._in_flight) >= self.max_in_flight:
            for work in self._in_flight.popleft()[0]:
                work.wait()
        works = [dist.isend(b, self.next, tag=tag) for b in buffers]
        self._in_flight.append((works, buffers))  # keep the buffers alive until sent
        self.bytes_sent += sum(b.numel() * b.element_size() for b in buffers)
        self.tensors_sent += len(buffers)

    def _post(self, tag: int) -> None:
        if tag not in self._shapes:
            self._recv_shapes(tag)
        act_shape, tgt_shape = self._shapes[tag]
        buffers = [torch.empty(act_shape, dtype=torch.float32, device=self.device)]
        if self._with_targets[tag]:
            numel = 1 + int(torch.tensor(tgt_shape).prod())
            buffers.append(torch.empty(numel, dtype=torch.int64, device=self.device))
        self._posted[tag] = _Pending([dist.irecv(b, self.prev, tag=tag) for b in buffers], tuple(buffers))

    def ready(self, tag: int = TRAIN_TAG) -> bool:
        """Has the next message fully arrived? Never blocks once shapes are known (posts the receive if needed)."""
        if tag not in self._posted:
            self._post(tag)
        return self._posted[tag].done()

    def recv(self, expected_step: int, tag: int = TRAIN_TAG,
             prefetch: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The next (activation, targets or None) from the previous stage; posts the following receive."""
        if tag not in self._posted:
            self._post(tag)
        buffers = self._posted.pop(tag).wait()
        if prefetch:
            self._post(tag)
        if len(buffers) == 1:
            return buffers[0], None
        act, meta = buffers
        step = int(meta[0])
        if step != expected_step:
            raise RuntimeError(f"stage link out of order: expected step {expected_step}, got {step}")
        return act, meta[1:].view(self._shapes[tag][1])

    # -- MAN's opt-in backward channel: weights of this stage's first block, to the previous stage --
    def send_weights(self, flat: torch.Tensor) -> None:
        flat = flat.detach().contiguous()
        self._weights_out.append((dist.isend(flat, self.prev, tag=WEIGHT_TAG), flat))
        self.weight_bytes_sent += flat.numel() * flat.element_size()

    def poll_weights(self, numel: int, block: bool = False) -> Optional[torch.Tensor]:
        """The next weight message from the next stage if it has arrived (or, with `block`, when it does)."""
        if self._weights_in is None:
            buf = torch.empty(numel, dtype=torch.float32, device=self.device)
            self._weights_in = _Pending([dist.irecv(buf, self.next, tag=WEIGHT_TAG)], (buf,))
        if not block and not self._weights_in.done():
            return None
        (buf,) = self._weights_in.wait()
        self._weights_in = None
        return buf

    # -- one collective over every rank of the pipeline (all stages, all replicas), for a channel
    # that keeps one tensor shared by every stage (NoProp's learned label embedding) --------------
    @property
    def ranks(self) -> int:
        """How many ranks `all_reduce` sums over."""
        return dist.get_world_size()

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum `t` in place over every rank of the pipeline (blocking: every rank calls it)."""
        dist.all_reduce(t)

    def drain(self) -> None:
        for work, _ in self._weights_out:
            work.wait()
        self._weights_out.clear()
        while self._in_flight:
            for work in self._in_flight.popleft()[0]:
                work.wait()

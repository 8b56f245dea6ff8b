"""Point-to-point link between neighbouring stages: activations and targets go forward, nothing back.

Sends are non-blocking with a bounded number in flight (back-pressure: a fast stage blocks once it
is `max_in_flight` messages ahead instead of queueing without limit). The receive for the next
message is posted as soon as the current one is taken, so communication overlaps compute.
Every tensor that crosses is a detached leaf — `sent_requires_grad` counts any that is not, so
a test can prove that no gradient or autograd graph ever spans two ranks.
"""

from __future__ import annotations

import collections
from typing import Optional

import torch
import torch.distributed as dist

TRAIN_TAG, EVAL_TAG, SHAPE_TAG = 0, 1, 2
_MAX_DIMS = 8


class StageLink:
    def __init__(self, prev_rank: Optional[int], next_rank: Optional[int], device: torch.device,
                 max_in_flight: int = 2):
        self.prev, self.next = prev_rank, next_rank
        self.device = device
        self.max_in_flight = max_in_flight
        self._in_flight: collections.deque = collections.deque()
        self._posted: dict[int, tuple] = {}
        self.act_shape: Optional[tuple[int, ...]] = None
        self.tgt_shape: Optional[tuple[int, ...]] = None
        self.bytes_sent = 0
        self.tensors_sent = 0
        self.sent_requires_grad = 0

    # -- shapes are exchanged once, so receive buffers can be allocated ahead of time -----------
    def send_shapes(self, act: torch.Tensor, tgt: torch.Tensor) -> None:
        header = torch.zeros(2 * _MAX_DIMS + 2, dtype=torch.int64)
        header[0], header[1] = act.dim(), tgt.dim()
        header[2:2 + act.dim()] = torch.tensor(act.shape)
        header[2 + _MAX_DIMS:2 + _MAX_DIMS + tgt.dim()] = torch.tensor(tgt.shape)
        dist.send(header.to(self.device), self.next, tag=SHAPE_TAG)

    def recv_shapes(self) -> None:
        header = torch.zeros(2 * _MAX_DIMS + 2, dtype=torch.int64, device=self.device)
        dist.recv(header, self.prev, tag=SHAPE_TAG)
        header = header.cpu().tolist()
        self.act_shape = tuple(header[2:2 + header[0]])
        self.tgt_shape = tuple(header[2 + _MAX_DIMS:2 + _MAX_DIMS + header[1]])

    # -- forward traffic ---------------------------------------------------------------------
    def send(self, act: torch.Tensor, tgt: torch.Tensor, step: int, tag: int = TRAIN_TAG) -> None:
        """Send (activation, [step] + targets) to the next stage without waiting."""
        if act.requires_grad or act.grad_fn is not None:
            self.sent_requires_grad += 1
        act = act.detach().float().contiguous()
        meta = torch.cat([torch.tensor([step], dtype=torch.int64, device=tgt.device), tgt.reshape(-1).long()])
        while len(self._in_flight) >= self.max_in_flight:
            for work in self._in_flight.popleft()[0]:
                work.wait()
        works = [dist.isend(act, self.next, tag=tag), dist.isend(meta, self.next, tag=tag)]
        self._in_flight.append((works, act, meta))  # keep the buffers alive until sent
        self.bytes_sent += act.numel() * act.element_size() + meta.numel() * meta.element_size()
        self.tensors_sent += 2

    def _post(self, tag: int) -> None:
        act = torch.empty(self.act_shape, dtype=torch.float32, device=self.device)
        meta = torch.empty(1 + int(torch.tensor(self.tgt_shape).prod()), dtype=torch.int64, device=self.device)
        self._posted[tag] = (dist.irecv(act, self.prev, tag=tag), dist.irecv(meta, self.prev, tag=tag), act, meta)

    def ready(self, tag: int = TRAIN_TAG) -> bool:
        """Has the next message fully arrived? Never blocks (posts the receive if needed)."""
        if tag not in self._posted:
            self._post(tag)
        w_act, w_meta, _, _ = self._posted[tag]
        return w_act.is_completed() and w_meta.is_completed()

    def recv(self, expected_step: int, tag: int = TRAIN_TAG, prefetch: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (activation, targets) from the previous stage; posts the following receive."""
        if tag not in self._posted:
            self._post(tag)
        w_act, w_meta, act, meta = self._posted.pop(tag)
        w_act.wait()
        w_meta.wait()
        if prefetch:
            self._post(tag)
        step = int(meta[0])
        if step != expected_step:
            raise RuntimeError(f"stage link out of order: expected step {expected_step}, got {step}")
        return act, meta[1:].view(self.tgt_shape)

    def drain(self) -> None:
        while self._in_flight:
            for work in self._in_flight.popleft()[0]:
                work.wait()

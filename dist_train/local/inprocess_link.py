"""The `StageLink` interface between the stages of one pipeline held in one process.

The single-process reference (`dist_train.train.local_reference`) trains every stage in turn and runs
each stage's real channels (MAN's weights sent back, NoProp's shared label embedding) through these
links, so the reference and the multi-rank pipeline share one implementation of every channel.
`InProcessLinks(k)` joins k links the way `StageLink`s join neighbouring ranks: a stage's
activations (and targets) go to the next stage's inbox, its weights to the previous stage's, and
`all_reduce` sums a tensor over every stage.

The stages run one after another, so a receive never waits: what it asks for was sent earlier in
the schedule, or the schedule is wrong, which is an error rather than a hang. The all-reduce is the
exception, a meeting of every stage: `InProcessLinks.on_every_stage` runs a hook on all stages at
once, one thread each, and the sum is taken in stage order, so runs stay deterministic.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Optional

import torch

from dist_train.local.link import TRAIN_TAG

_MEET_TIMEOUT_S = 120.0  # a stage that never joins an all-reduce is a bug: fail, do not hang


class _Hub:
    """What the links of one process share: each stage's inboxes, and the all-reduce's meeting."""

    def __init__(self, num_stages: int):
        self.num_stages = num_stages
        self.forward = [collections.defaultdict(collections.deque) for _ in range(num_stages)]  # by tag
        self.weights = [collections.deque() for _ in range(num_stages)]
        self._slots: list = [None] * num_stages
        self._total: Optional[torch.Tensor] = None
        self.meeting = threading.Barrier(num_stages, action=self._sum, timeout=_MEET_TIMEOUT_S)

    def _sum(self) -> None:  # run by one thread once every stage has put its tensor in
        self._total = torch.stack(self._slots).sum(0)

    def all_reduce(self, stage: int, t: torch.Tensor) -> None:
        self._slots[stage] = t
        self.meeting.wait()
        # The next meeting's sum replaces _total only once every stage has arrived there, i.e. after
        # every stage has copied this one's.
        t.copy_(self._total)


class InProcessLink:
    """Stage `stage`'s link; the counters are `StageLink`'s."""

    def __init__(self, hub: _Hub, stage: int):
        self.hub, self.stage = hub, stage
        self.bytes_sent = 0
        self.tensors_sent = 0
        self.sent_requires_grad = 0
        self.weight_bytes_sent = 0

    # -- forward traffic ---------------------------------------------------------------------
    def send(self, act: torch.Tensor, tgt: Optional[torch.Tensor], step: int, tag: int = TRAIN_TAG) -> None:
        if act.requires_grad or act.grad_fn is not None:
            self.sent_requires_grad += 1
        act = act.detach().float().clone()  # what a wire delivers: a float32 leaf of its own
        self.hub.forward[self.stage + 1][tag].append((step, act, tgt))
        self.bytes_sent += act.numel() * act.element_size() + (0 if tgt is None else tgt.numel() * tgt.element_size())
        self.tensors_sent += 1 if tgt is None else 2

    def ready(self, tag: int = TRAIN_TAG) -> bool:
        return bool(self.hub.forward[self.stage][tag])

    def recv(self, expected_step: int, tag: int = TRAIN_TAG,
             prefetch: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        inbox = self.hub.forward[self.stage][tag]
        if not inbox:
            raise RuntimeError(f"in-process link: stage {self.stage} expects message {expected_step} on tag {tag}, "
                               "and the previous stage has not sent it")
        step, act, tgt = inbox.popleft()
        if step != expected_step:
            raise RuntimeError(f"in-process link out of order: expected step {expected_step}, got {step}")
        return act, tgt

    # -- MAN's backward channel: weights to the previous stage --------------------------------
    def send_weights(self, flat: torch.Tensor) -> None:
        flat = flat.detach().clone()
        self.hub.weights[self.stage - 1].append(flat)
        self.weight_bytes_sent += flat.numel() * flat.element_size()

    def poll_weights(self, numel: int, block: bool = False) -> Optional[torch.Tensor]:
        inbox = self.hub.weights[self.stage]
        if inbox:
            flat = inbox.popleft()
            if flat.numel() != numel:
                raise RuntimeError(f"in-process link: a weight message of {flat.numel()} values, expected {numel}")
            return flat
        if block:
            raise RuntimeError(f"in-process link: stage {self.stage} waits for weights the next stage has not sent")
        return None

    # -- the one collective ------------------------------------------------------------------
    @property
    def ranks(self) -> int:
        return self.hub.num_stages

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum `t` in place over every stage; every stage must call it inside `on_every_stage`."""
        self.hub.all_reduce(self.stage, t)

    def drain(self) -> None:
        pass  # nothing is ever in flight


class InProcessLinks(list):
    """One `InProcessLink` per stage of a pipeline held in one process."""

    def __init__(self, num_stages: int):
        self.hub = _Hub(num_stages)
        super().__init__(InProcessLink(self.hub, k) for k in range(num_stages))

    def on_every_stage(self, hook: Callable[[int], None]) -> None:
        """`hook(k)` for every stage k at once, one thread each, so that an `all_reduce` inside meets
        every stage's; returns when all are done, raising the first error."""
        if len(self) == 1:
            hook(0)
            return
        errors: list[BaseException] = []

        def run(k: int) -> None:
            try:
                hook(k)
            except BaseException as e:  # handed to the caller below
                errors.append(e)
                self.hub.meeting.abort()  # the others must not wait for this stage

        threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(len(self))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

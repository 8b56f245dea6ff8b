"""The in-process link: the `StageLink` interface between stages held in one process, through which the
single-process reference runs the pipeline's real channels (MAN's weights, NoProp's shared embedding)."""

from __future__ import annotations

import time

import pytest
import torch

from dist_train.local.inprocess_link import InProcessLinks


def test_in_process_all_reduce_sums_over_every_stage() -> None:
    links = InProcessLinks(3)
    tensors = [torch.full((2, 2), float(k + 1)) for k in range(3)]
    for _ in range(2):  # a second meeting reuses the first's
        links.on_every_stage(lambda k: links[k].all_reduce(tensors[k]))
    assert all(torch.equal(t, torch.full((2, 2), 18.0)) for t in tensors)
    assert links[0].ranks == 3


def test_in_process_link_delivers_detached_messages_in_order() -> None:
    links = InProcessLinks(2)
    act = torch.ones(2, 3, requires_grad=True) * 2
    links[0].send(act, torch.tensor([1, 0]), 7)
    got, y = links[1].recv(7)
    assert got.grad_fn is None and not got.requires_grad and torch.equal(got, act.detach())
    assert torch.equal(y, torch.tensor([1, 0]))
    assert links[0].sent_requires_grad == 1 and links[0].tensors_sent == 2
    links[0].send(act.detach(), None, 8)
    with pytest.raises(RuntimeError, match="out of order"):
        links[1].recv(9)
    with pytest.raises(RuntimeError, match="not sent"):
        links[1].recv(10)
    links[1].send_weights(torch.arange(4.0))  # MAN's weights go to the previous stage
    assert torch.equal(links[0].poll_weights(4), torch.arange(4.0))
    assert links[0].poll_weights(4) is None
    with pytest.raises(RuntimeError, match="not sent"):
        links[0].poll_weights(4, block=True)


def test_a_stage_that_fails_does_not_leave_the_others_waiting() -> None:
    links = InProcessLinks(2)

    def hook(k: int) -> None:
        if k == 0:
            raise ValueError("stage 0 broke")
        links[k].all_reduce(torch.zeros(1))

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="stage 0 broke"):
        links.on_every_stage(hook)
    assert time.perf_counter() - t0 < 30  # stage 1 was released from the meeting, not timed out

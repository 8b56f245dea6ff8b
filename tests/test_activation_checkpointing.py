"""`parallel.activation_checkpointing`: every block recomputed in backward, the same arithmetic.

Tolerance: the recomputation runs the same CPU kernels on the same inputs with the RNG state
replayed, so losses and gradients are expected bit-identical; the checks allow rtol 1e-6 /
atol 1e-7 (float32 rounding noise only) so that a change of kernel order would not make them flaky,
while any real difference (a missed dropout mask, a block run twice) is orders of magnitude larger.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from dist_train.models.gpt import GPT
from dist_train.parallel.activation_checkpointing import apply_activation_checkpointing

RTOL, ATOL = 1e-6, 1e-7


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Forward under a saved-tensors hook: the loss and the bytes autograd keeps for backward."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(model(x[:, :-1]), x[:, 1:])
    return loss, total[0]


def test_checkpointed_model_same_loss_and_gradients() -> None:
    torch.manual_seed(0)
    plain = GPT(vocab_size=64, n_layer=3, width=32, n_head=2, block_size=16, dropout=0.1)  # dropout: RNG replay
    ckpt = apply_activation_checkpointing(copy.deepcopy(plain))
    assert all(type(b).__name__ == "CheckpointWrapper" for b in ckpt.blocks)
    # Names are unchanged, so checkpoints load either way.
    assert list(ckpt.state_dict()) == list(plain.state_dict())

    x = torch.randint(0, 64, (4, 17))
    torch.manual_seed(1)
    loss_p, saved_p = _saved_bytes(plain, x)
    loss_p.backward()
    torch.manual_seed(1)
    loss_c, saved_c = _saved_bytes(ckpt, x)
    loss_c.backward()

    torch.testing.assert_close(loss_c, loss_p, rtol=RTOL, atol=ATOL)
    grads_p = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        ref = grads_p[name.replace("._checkpoint_wrapped_module", "")]
        torch.testing.assert_close(p.grad, ref.grad, rtol=RTOL, atol=ATOL, msg=name)
    # Not vacuous: the blocks' inner activations are no longer kept (only their inputs).
    assert saved_c < 0.5 * saved_p, (saved_c, saved_p)


def test_bp_loop_with_checkpointing_trains_the_same(tmp_path: Path) -> None:
    """`train` with the option on and off: the same losses step for step, with accumulation."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from dist_train.config import load_config
    from dist_train.runtime import discover, init_distributed
    from dist_train.train.hooks import Hooks
    from dist_train.train.loop import train

    applied = []

    def spy(backend) -> None:  # the blocks the backend trains: how many recompute in backward
        applied.append(sum(isinstance(block, CheckpointWrapper) for block in backend.module.blocks))

    losses = {}
    for on in (False, True):
        cfg = load_config(None, [
            "model.n_layer=2", "model.width=32", "model.n_head=2", "model.block_size=16", "data.max_bytes=200000",
            "train.batch_size=8", "train.grad_accum=2", "train.steps=4", "train.log_every=1", "train.eval_batches=1",
            "optim.warmup_steps=2", "model.dropout=0.1", "parallel.backend=none", "parallel.stages=1",
            "runtime.device=cpu", "telemetry.tensorboard=false", 'telemetry.progress="off"', "telemetry.energy=none",
            "checkpoint.at_end=false", "checkpoint.resume=never", f"run.dir={tmp_path}", f"run.name=ac-{on}",
            f"parallel.activation_checkpointing={str(on).lower()}"])
        ctx = init_distributed(cfg, discover({}))
        train(cfg, ctx, ["test"], hooks=Hooks(on_setup=spy))
        losses[on] = _losses(tmp_path / f"ac-{on}")
    assert applied == [0, 2]  # only the run with the option wraps its 2 blocks
    assert losses[True] == pytest.approx(losses[False], rel=RTOL, abs=ATOL)
    assert losses[True][0] != pytest.approx(losses[True][-1], rel=1e-3)  # it trains


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_local_stages_refuse_it() -> None:
    from dist_train.config import load_config
    from dist_train.errors import UserError

    with pytest.raises((UserError, ValueError), match="parallel.activation_checkpointing"):
        load_config(None, ["parallel.stages=2", "parallel.activation_checkpointing=true"])

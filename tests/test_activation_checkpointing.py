"""`parallel.activation_checkpointing`: full (every block recomputed in backward) and selective
(every n-th block; per op, matmul outputs kept), the same arithmetic as none, less memory.

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




# --- modes --------------------------------------------------------------------------------------
SELECTIVE = {"every_n": {"selective": "every_n", "every_n": 2}, "op": {"selective": "op"},
             "op_every_second": {"selective": "op", "save_matmuls": "every_second"}}


def _section(mode: str, **options):
    from dist_train.config.schema import ActivationCheckpointingSection

    return ActivationCheckpointingSection(mode=mode, **options)


def _wrapped(model: torch.nn.Module, mode: str, **options) -> torch.nn.Module:
    from dist_train.parallel.activation_checkpointing import checkpoint_mode

    model = copy.deepcopy(model)
    checkpoint_mode(_section(mode, **options)).apply(model, model.blocks)
    return model


def _tiny_llama() -> torch.nn.Module:
    from dist_train.models.llama import Llama

    torch.manual_seed(0)
    model = Llama(vocab_size=64, n_layer=3, width=32, n_head=4, n_kv_heads=2, hidden=64, block_size=16)
    model.init_weights()
    return model


def _grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(1)
    loss = model.loss(model(x[:, :-1]), x[:, 1:])
    loss.backward()
    # the wrapper's own prefix stripped, as its state dict does
    return loss.detach(), {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_selective_modes_give_the_gradients_of_none(name: str) -> None:
    """Every selective kind on a GPT with dropout (the RNG replay) and on a Llama (SDPA with grouped
    k/v heads, rotary tables, its SwiGLU autograd function): the same loss and gradients as no
    checkpointing, at the tolerance above (recomputation runs the same kernels on the same inputs)."""
    torch.manual_seed(0)
    plain = (GPT(vocab_size=64, n_layer=3, width=32, n_head=2, block_size=16, dropout=0.1) if name == "gpt"
             else _tiny_llama())
    x = torch.randint(0, 64, (4, 17))
    loss_ref, ref = _grads(copy.deepcopy(plain), x)
    for kind, options in SELECTIVE.items():
        model = _wrapped(plain, "selective", **options)
        wrapped = [type(b).__name__ == "CheckpointWrapper" for b in model.blocks]
        assert wrapped == ([True, False, True] if kind == "every_n" else [True] * 3), kind
        assert list(model.state_dict()) == list(plain.state_dict()), kind  # checkpoints load either way
        loss, grads = _grads(model, x)
        torch.testing.assert_close(loss, loss_ref, rtol=RTOL, atol=ATOL, msg=kind)
        assert grads.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(grads[n], ref[n], rtol=RTOL, atol=ATOL, msg=f"{kind} {n}")


def test_memory_orders_none_selective_full() -> None:
    """Peak allocated tensor bytes of one forward and backward (the CPU allocator's own events) on a
    Llama whose activations outweigh its weights: none > selective (either kind) > full, and
    saving every second matmul keeps less than saving every one."""
    from dist_train.bench.memory import AllocatedPeak
    from dist_train.models.llama import Llama

    torch.manual_seed(0)
    plain = Llama(vocab_size=64, n_layer=4, width=32, n_head=4, n_kv_heads=2, hidden=128, block_size=32)
    plain.init_weights()
    x = torch.randint(0, 64, (4, 33))
    peaks = {}
    for side, (mode, options) in {"none": ("none", {}), "full": ("full", {}),
                                  **{k: ("selective", o) for k, o in SELECTIVE.items()}}.items():
        model = _wrapped(plain, mode, **options)
        model.loss(model(x[:, :-1]), x[:, 1:]).backward()  # first-call allocations out of the figure
        model.zero_grad(set_to_none=True)
        with AllocatedPeak() as probe:
            model.loss(model(x[:, :-1]), x[:, 1:]).backward()
        peaks[side] = probe.peak
    assert peaks["none"] > peaks["every_n"] > peaks["full"], peaks
    assert peaks["none"] > peaks["op"] > peaks["op_every_second"] > peaks["full"], peaks


def test_config_modes_and_older_spellings() -> None:
    from dist_train.config import load_config

    def section(*overrides: str):
        return load_config(None, list(overrides)).parallel.activation_checkpointing

    assert section().mode == "none"
    assert section("parallel.activation_checkpointing=true").mode == "full"  # configs saved before the modes
    assert section("parallel.activation_checkpointing=false").mode == "none"
    got = section("parallel.activation_checkpointing.mode=selective", "parallel.activation_checkpointing.selective=every_n",
                  "parallel.activation_checkpointing.every_n=3")
    assert (got.mode, got.selective, got.every_n) == ("selective", "every_n", 3)
    assert section("parallel.activation_checkpointing=selective").selective == "every_n"  # the default kind


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("optim", ["dp_sgd", "diff2"])
def test_private_optimizers_refuse_every_mode(mode: str, optim: str) -> None:
    from dist_train.config import load_config

    from dist_train.errors import UserError

    with pytest.raises(UserError, match=f"parallel.activation_checkpointing: {optim}"):
        load_config(None, [f"optim.name={optim}", "parallel.stages=1", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null",
                           "privacy.diff2.sigma1=1.0", "privacy.diff2.sigma2=1.0",
                           f"parallel.activation_checkpointing={mode}"])


def test_local_stage_checkpoints_its_blocks_by_model_index() -> None:
    """A local-learning stage's blocks are numbered as in the model: with every_n 2 over 4 blocks
    cut at 1, stage 0 wraps block 0 and stage 1 wraps blocks 2 (its second), not its first."""
    from dist_train.config import load_config
    from dist_train.data.base import DataInfo
    from dist_train.local.build import build_stage
    from dist_train.local.layout import stage_layout

    cfg = load_config(None, ["model.n_layer=4", "model.width=32", "model.n_head=2", "model.block_size=16",
                             "parallel.stages=2", "parallel.cut_points=[1]", "parallel.backend=none",
                             "parallel.activation_checkpointing.mode=selective",
                             "parallel.activation_checkpointing.selective=every_n"])
    info = DataInfo(task="lm", vocab_size=64, input_shape=None, num_classes=None, train_size=0, val_size=0)
    wrapped = []
    for k in range(2):
        stage, _ = build_stage(cfg, info, stage_layout(k, 2, 2))
        wrapped.append([type(b).__name__ == "CheckpointWrapper" for b in stage.blocks])
        assert not any("_checkpoint_wrapped_module" in n for n in stage.state_dict())
    assert wrapped == [[True], [False, True, False]]


def test_meta_init_gives_the_same_weights_with_wrapped_blocks() -> None:
    """A model built on meta and initialised after the wrappers (as under FSDP2) gets the weights of
    the unwrapped model: its rows are seeded by the state-dict names, which the wrapper leaves alone."""
    from dist_train.parallel.meta_init import materialize

    weights = {}
    for mode, options in {"none": {}, "full": {}, "every_n": SELECTIVE["every_n"]}.items():
        with torch.device("meta"):
            from dist_train.models.llama import Llama

            model = Llama(vocab_size=64, n_layer=3, width=32, n_head=4, n_kv_heads=2, hidden=64, block_size=16)
        model = _wrapped(model, "selective" if options else mode, **options)
        materialize(model, torch.device("cpu"), seed=3)
        weights[mode] = model.state_dict()
    for mode in ("full", "every_n"):
        assert weights[mode].keys() == weights["none"].keys()
        for n, w in weights["none"].items():
            assert torch.equal(weights[mode][n], w), (mode, n)

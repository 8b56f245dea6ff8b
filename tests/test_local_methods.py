"""Local-learning methods: heads build, losses are finite, gradients stay inside the stage, and a
few steps on a fixed batch lower every method's local loss, for the GPT, MLP and CNN."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dist_train.errors import UserError
from dist_train.local.method import StageInfo
from dist_train.local.methods import METHODS, get_method
from dist_train.local.methods.auglocal import AugLocal
from dist_train.local.methods.tpsgd import TpSGD
from local_models import fit, make_batch, make_model, stage_info  # tests/ is on sys.path

torch.set_num_threads(1)  # shared 2-core machine; these models are tiny anyway


class LocalStage:
    """The stage's own modules (embed if first + its blocks) and how it receives its input."""

    def __init__(self, model, info: StageInfo, blocks: range, x: torch.Tensor):
        self.modules = torch.nn.ModuleList([model.blocks[i] for i in blocks])
        self.embed = model.embed if info.index == 0 else None
        if self.embed is not None:
            self.modules.append(self.embed)
            self.stage_input = x
        else:
            with torch.no_grad():  # what the previous stages would have sent
                h = model.embed(x)
                for i in range(blocks.start):
                    h = model.blocks[i](h)
            self.stage_input = h
        self.blocks = [model.blocks[i] for i in blocks]

    def forward(self) -> torch.Tensor:
        h = self.stage_input.detach()
        if self.embed is not None:
            h = self.embed(h)
        for b in self.blocks:
            h = b(h)
        return h


# NoProp has no auxiliary heads (its stages are whole models of their own): tests/test_noprop.py.
CASES = [(m, model, stage) for m in METHODS if m not in ("noprop", "forward_forward")
         for model in ("gpt", "mlp", "cnn") for stage in ((0, 2), (1, 3))]


@pytest.mark.parametrize("method_name,model_name,stage", CASES,
                         ids=[f"{m}-{n}-s{s[0]}of{s[1]}" for m, n, s in CASES])
def test_method_trains_locally(method_name, model_name, stage):
    model = make_model(model_name)
    x, y = make_batch(model_name)
    info, blocks = stage_info(model, model_name, *stage)
    info = dataclasses.replace(info, input_shape=tuple(x.shape[1:]) if x.is_floating_point() else ())
    st = LocalStage(model, info, blocks, x)
    method = get_method(method_name)
    # As HeadStage: the model input reaches the local loss on stage 0, and on every stage of a
    # method that needs it (InfoPro), detached.
    x_in = x.detach() if info.index == 0 or method.needs_input else None
    torch.manual_seed(123)
    head = method.build_head(info)

    def loss_at(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)  # same random draws (if any) at start and end
        return method.local_loss(head, st.forward(), y, x_in, info)

    loss = loss_at(7)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    # Trainable head parameters only: MAN's EMA copy is frozen on purpose (moved by the EMA update).
    head_params = [p for p in head.parameters() if p.requires_grad]
    if method_name == "tpsgd":
        assert not head_params  # the paper's rule: the stage's own output meets the target, no readout
    else:
        assert head_params and all(p.grad is not None for p in head_params)
        assert any(p.grad.abs().sum() > 0 for p in head_params)
    stage_grads = [p.grad for p in st.modules.parameters()]
    assert all(g is not None for g in stage_grads)
    assert any(g.abs().sum() > 0 for g in stage_grads)
    # Isolation: the local loss reaches no parameter of the model outside this stage (earlier
    # blocks, the later blocks AugLocal and MAN copy, the model's own head).
    mine = {id(p) for p in st.modules.parameters()}
    outside = [n for n, p in model.named_parameters() if id(p) not in mine and p.grad is not None]
    assert not outside, outside

    initial = loss.item()
    final = fit([*st.modules.parameters(), *head_params], loss_at)
    assert math.isfinite(final) and final < initial, (initial, final)


def test_auglocal_depth_shrinks_and_copies_are_fresh():
    model = make_model("mlp", n_layer=8)
    method = AugLocal()
    depths = []
    for k in range(3):
        info, _ = stage_info(model, "mlp", k, 4)
        head = method.build_head(info)
        depths.append(len(head.blocks))
        ref = {p.data_ptr() for b in info.later_blocks for p in b.parameters()}
        copies = list(head.blocks.parameters())
        assert copies and all(p.data_ptr() not in ref for p in copies)
        # Re-initialised, not copied weights.
        for j, block in zip(head.sampled, head.blocks):
            assert not torch.equal(block.fc.weight, info.later_blocks[j].fc.weight)
    assert all(a >= b for a, b in zip(depths, depths[1:])) and depths[0] > depths[-1], depths
    # GPT blocks deep-copy and run too.
    gpt = make_model("gpt", n_layer=6)
    gd = [len(method.build_head(stage_info(gpt, "gpt", k, 3)[0]).blocks) for k in range(2)]
    assert gd[0] > gd[1], gd


def test_tpsgd_projection_fixed_and_per_stage():
    model = make_model("gpt")
    method = TpSGD()
    info0, _ = stage_info(model, "gpt", 0, 3)
    info1, _ = stage_info(model, "gpt", 1, 3)
    a, b, c = method.build_head(info0), method.build_head(info0), method.build_head(info1)
    assert not a.projection.requires_grad
    assert all(p is not a.projection for p in a.parameters())
    assert "projection" in a.state_dict()
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, c.projection)


def test_get_method_errors():
    assert set(METHODS) == {"dgl", "mono_forward", "infopro", "auglocal", "forward_forward", "tpsgd", "man",
                            "noprop"}
    for name in METHODS:
        assert get_method(name).name == name
    with pytest.raises(UserError, match="local.method: expected one of .*, got 'bogus'"):
        get_method("bogus")


def test_man_ema_moves_toward_the_received_weights():
    from dist_train.local.methods.man import MAN, flat_block_weights

    block = torch.nn.Linear(4, 4)
    head = MAN(momentum=0.5).build_head(StageInfo(index=0, num_stages=2, task="classify", width=4, num_classes=3,
                                                  later_blocks=(block,), model_name="mlp"))
    assert not any(p.requires_grad for p in head.ema.parameters())  # frozen between updates
    target = torch.nn.Linear(4, 4)
    before = flat_block_weights(head.ema)
    MAN(momentum=0.5).update_ema(head, flat_block_weights(target))
    after = flat_block_weights(head.ema)
    assert torch.allclose(after, 0.5 * before + 0.5 * flat_block_weights(target))

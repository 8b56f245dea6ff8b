"""Each method's local loss on a fixed small tensor equals the paper's formula, recomputed here from
plain torch operations on the modules' weights (never through the method's own helpers): DGL,
Mono-Forward, MAN and Forward-Forward. (InfoPro, AugLocal and tpSGD: tests/test_method_formulas.py;
NoProp: tests/test_noprop.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_train.local.methods import get_method
from local_models import make_batch, make_model, stage_info  # tests/ is on sys.path

torch.set_num_threads(1)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, written out: -log softmax at the label."""
    logp = logits - logits.logsumexp(dim=1, keepdim=True)
    return -logp[torch.arange(len(y)), y].mean()


def _mlp_stage0(method_name: str):
    model = make_model("mlp")
    x, y = make_batch("mlp")
    info, blocks = stage_info(model, "mlp", 0, 2)
    stage = get_method(method_name).build_stage(model, blocks, info)
    return model, stage, x, y, blocks


def _h(model, blocks, x):
    """Stage 0's output by hand: embed (Linear + ReLU) then each block (Linear + ReLU)."""
    lin = model.embed[1]
    h = F.relu(x @ lin.weight.t() + lin.bias)
    for i in blocks:
        h = F.relu(h @ model.blocks[i].fc.weight.t() + model.blocks[i].fc.bias)
    return h


def test_dgl_is_cross_entropy_of_a_small_classifier():
    model, stage, x, y, blocks = _mlp_stage0("dgl")
    h = _h(model, blocks, x)
    l1, l2 = stage.head[0], stage.head[2]
    want = _ce(F.relu(h @ l1.weight.t() + l1.bias) @ l2.weight.t() + l2.bias, y)
    assert stage(x=x, y=y).item() == pytest.approx(want.item(), rel=1e-5)


def test_mono_forward_is_cross_entropy_of_the_goodness_a_M_transposed():
    model, stage, x, y, blocks = _mlp_stage0("mono_forward")
    h = _h(model, blocks, x)
    goodness = h @ stage.head.M.weight.t()  # G = a M^T, M [classes, width], no bias
    assert stage.head.M.bias is None
    assert stage(x=x, y=y).item() == pytest.approx(_ce(goodness, y).item(), rel=1e-5)


def test_man_head_adds_the_ema_and_the_learnable_block_and_follows_the_ema_rule():
    model, stage, x, y, blocks = _mlp_stage0("man")
    nxt = model.blocks[blocks.stop]  # the next stage's first block
    head = stage.head
    # At init the EMA copy equals the next block; the learnable interface is a fresh block.
    assert torch.equal(head.ema.fc.weight, nxt.fc.weight)
    assert not torch.equal(head.lb.fc.weight, nxt.fc.weight)
    assert not any(p.requires_grad for p in head.ema.parameters())
    h = _h(model, blocks, x)
    mixed = F.relu(h @ head.ema.fc.weight.t() + head.ema.fc.bias) + F.relu(h @ head.lb.fc.weight.t() + head.lb.fc.bias)
    l1, l2 = head.out[0], head.out[2]
    want = _ce(F.relu(mixed @ l1.weight.t() + l1.bias) @ l2.weight.t() + l2.bias, y)
    assert stage(x=x, y=y).item() == pytest.approx(want.item(), rel=1e-5)
    # theta_ema <- m theta_ema + (1 - m) theta_next, with the paper's m = 0.995 by default.
    method = stage.method
    assert method.momentum == 0.995 and method.every == 1
    new = torch.randn(sum(p.numel() for p in nxt.parameters()))
    before = [p.clone() for p in head.ema.parameters()]
    method.update_ema(head, new)
    parts = torch.split(new, [p.numel() for p in before])
    for b, p, w in zip(before, head.ema.parameters(), parts):
        assert torch.allclose(p, 0.995 * b + 0.005 * w.view_as(b))


def _ff_by_hand(model, x, labels, theta_of):
    """Layer outputs of stage 0 (embed + block 0) on x with `labels` embedded, and per-layer goodness."""
    xl = x.clone()
    xl[:, :10] = F.one_hot(labels, 10).float()  # label embedded in the first C entries (label_scale 1)
    lin = model.embed[1]
    a1 = F.relu(xl @ lin.weight.t() + lin.bias)
    a1n = a1 / a1.pow(2).mean(1, keepdim=True).sqrt()  # length-normalised (RMS 1)
    a2 = F.relu(a1n @ model.blocks[0].fc.weight.t() + model.blocks[0].fc.bias)
    return [a1, a2], [a.pow(2).sum(1) for a in (a1, a2)]


def test_forward_forward_layer_losses_are_hintons_logistic_goodness_loss():
    model = make_model("mlp", n_layer=2)
    x, y = make_batch("mlp")
    info, blocks = stage_info(model, "mlp", 0, 2)
    assert list(blocks) == [0]
    stage = get_method("forward_forward").build_stage(model, blocks, info)
    torch.manual_seed(5)
    got = stage(x=x, y=y)
    torch.manual_seed(5)
    wrong = (y + torch.randint(1, 10, y.shape)) % 10
    assert (wrong != y).all()
    (_, _), g_pos = _ff_by_hand(model, x, y, None)
    _, g_neg = _ff_by_hand(model, x, wrong, None)
    theta = 32.0  # default threshold: the layer's number of units (width 32)
    want = sum((torch.log1p(torch.exp(theta - gp)) + torch.log1p(torch.exp(gn - theta))).mean()
               for gp, gn in zip(g_pos, g_neg))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_forward_forward_predicts_by_goodness_over_all_labels_but_the_first_layer():
    model = make_model("mlp", n_layer=2)
    x, _ = make_batch("mlp")
    stages = []
    for k in range(2):
        info, blocks = stage_info(model, "mlp", k, 2)
        stages.append(get_method("forward_forward").build_stage(model, blocks, info))
    with torch.no_grad():
        scores = stages[1](received=stages[0](x=x))
        # By hand: every label, goodness of layer 2 (stage 0's block) + layer 3 (stage 1's block).
        want = torch.zeros(len(x), 10)
        for c in range(10):
            (_, a2), (_, g2) = _ff_by_hand(model, x, torch.full((len(x),), c), None)
            a2n = a2 / a2.pow(2).mean(1, keepdim=True).sqrt()
            a3 = F.relu(a2n @ model.blocks[1].fc.weight.t() + model.blocks[1].fc.bias)
            want[:, c] = g2 + a3.pow(2).sum(1)
    assert torch.allclose(scores, want, rtol=1e-5, atol=1e-4)
    assert math.isfinite(scores.sum().item())

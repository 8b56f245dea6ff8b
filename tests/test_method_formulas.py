"""Each method's local loss equals its paper's formula, recomputed here independently.

InfoPro (arXiv 2101.10832): L_k = λ1_k·L_recons(w(h), x) + λ2_k·CE(g(h), y), with the official
code's λ schedule and decoder (BatchNorm, sigmoid, BCE against the image restored to [0, 1]);
AugLocal (arXiv 2402.17318): the pyramidal depth rule, uniform sampling, fresh copies,
L = CE(out(b_d(…b_1(h))), y); tpSGD (arXiv 2208.08503): J = mse(y_i, P_i·onehot(y)).
The expected values are written out by hand or computed with plain torch ops on the head's weights,
never with the method's own helpers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_train.local.method import StageInfo
from dist_train.local.methods import get_method
from dist_train.local.methods.auglocal import AugLocal
from dist_train.local.methods.infopro import InfoPro
from dist_train.local.methods.tpsgd import TpSGD
from dist_train.models import CNN, GPT, MLP

torch.set_num_threads(1)

B, W, C, V = 6, 16, 10, 256


def info(model_name: str, index: int, num_stages: int, later=(), input_shape=(), width=W,
         image_norm=None) -> StageInfo:
    lm = model_name == "gpt"
    return StageInfo(index=index, num_stages=num_stages, task="lm" if lm else "classify", width=width,
                     num_classes=V if lm else C, later_blocks=tuple(later), model_name=model_name,
                     input_shape=tuple(input_shape), image_norm=image_norm)


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy by hand: -log softmax at the label."""
    logits, y = logits.reshape(-1, logits.size(-1)), y.reshape(-1)
    return -(logits.log_softmax(-1)[torch.arange(len(y)), y]).mean()


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def bce_of_sigmoid(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of sigmoid(z) against t in [0, 1], written out."""
    p = 1 / (1 + torch.exp(-z))
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


def batch_norm_train(z: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """BatchNorm in training mode: per-channel batch mean and biased variance."""
    mu = z.mean(dim=(0, 2, 3), keepdim=True)
    var = ((z - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (z - mu) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


# ---------------------------------------------------------------- InfoPro

# (K, stage k) -> (λ1_k, λ2_k): the official README's ResNet-110 CIFAR-10 commands
# (--ixx_1 --ixy_1 --ixx_2 --ixy_2 per --local_module_num), interpolated at r = k/(K-2).
INFOPRO_WEIGHTS = {
    (2, 0): (5.0, 0.5),                                           # K=2: 5, 0.5
    (4, 0): (1.0, 0.0), (4, 1): (0.5, 0.5), (4, 2): (0.0, 1.0),   # K=4: λ1 1 -> 0, λ2 0 -> 1
    (3, 0): (1.0, 0.0), (3, 1): (0.0, 1.0),                       # K=3: nearest row, K=4's
    (5, 2): (1 / 3, 2 / 3),                                       # K=5: K=4's row at r = 2/3
    (8, 0): (5.0, 0.0), (8, 3): (2.5, 0.5), (8, 6): (0.0, 1.0),   # K=8: λ1 5 -> 0, λ2 0 -> 1
    (16, 7): (2.75, 0.5), (16, 14): (0.5, 1.0),                   # K=16: λ1 5 -> 0.5, λ2 0 -> 1
}


@pytest.mark.parametrize("key", list(INFOPRO_WEIGHTS), ids=[f"K{k}-s{s}" for k, s in INFOPRO_WEIGHTS])
def test_infopro_weights_follow_the_official_schedule(key):
    num_stages, index = key
    assert InfoPro().weights(index, num_stages) == pytest.approx(INFOPRO_WEIGHTS[key])


def test_infopro_options_override_the_schedule():
    # K=4, stage 1 (r = 1/2): λ1 = 2·½ + 0·½ (λ1_last from the table), λ2 = 0·½ + 3·½.
    assert InfoPro(lambda1_first=2.0, lambda2_last=3.0).weights(1, 4) == pytest.approx((1.0, 1.5))
    # The config section hands every option over, unset ones as None.
    from dist_train.local.methods.infopro import InfoProOptions
    assert get_method("infopro", InfoProOptions().model_dump()).weights(0, 2) == pytest.approx((5.0, 0.5))
    assert InfoPro.needs_input


def _mlp_classifier(head, h):
    t = head.task
    return linear(torch.relu(linear(h, t[0])), t[2])


def _cnn_classifier(head, h):
    t = head.task
    z = torch.relu(F.conv2d(h, t[0].weight, t[0].bias, padding=1))
    return linear(z.mean(dim=(2, 3)), t[3])


def _gpt_classifier(head, h):
    ln, lin = head.task
    return F.layer_norm(h, (h.size(-1),), ln.weight, ln.bias, ln.eps) @ lin.weight.T


@pytest.mark.parametrize("num_stages,index", [(2, 0), (4, 1), (5, 2)])
def test_infopro_mlp_loss_is_the_papers(num_stages, index):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(B, 1, 8, 8, generator=g)
    h, y = torch.randn(B, W, generator=g), torch.randint(0, C, (B,), generator=g)
    method = InfoPro()
    inf = info("mlp", index, num_stages, input_shape=(1, 8, 8), image_norm=((0.0,), (1.0,)))
    head = method.build_head(inf)
    dec = head.decoder
    recon = linear(torch.relu(linear(h, dec[0])), dec[2])  # w(h): [B, 64]
    assert recon.shape == (B, 64)
    lam1, lam2 = INFOPRO_WEIGHTS[(num_stages, index)]
    expected = lam1 * bce_of_sigmoid(recon, x.reshape(B, -1)) + lam2 * ce(_mlp_classifier(head, h), y)
    torch.testing.assert_close(method.local_loss(head, h, y, x, inf), expected)


def test_infopro_reconstructs_an_input_that_is_not_an_image_with_mse():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, 1, 8, 8, generator=g) * 3  # not pixels in [0, 1]: no image_norm
    h, y = torch.randn(B, W, generator=g), torch.randint(0, C, (B,), generator=g)
    method = InfoPro()
    inf = info("mlp", 0, 2, input_shape=(1, 8, 8))
    head = method.build_head(inf)
    recon = linear(torch.relu(linear(h, head.decoder[0])), head.decoder[2])
    expected = 5.0 * ((recon - x.reshape(B, -1)) ** 2).mean() + 0.5 * ce(_mlp_classifier(head, h), y)
    torch.testing.assert_close(method.local_loss(head, h, y, x, inf), expected)


@pytest.mark.parametrize("spatial", [8, 4], ids=["same-size", "upsampled"])
def test_infopro_cnn_loss_is_the_papers(spatial):
    """The official decoder: conv3x3 -> BatchNorm -> ReLU -> conv3x3 -> sigmoid, BCE against the
    image restored from the normalised input x (x·std + mean per channel)."""
    g = torch.Generator().manual_seed(1)
    mean, std = torch.tensor([0.2, 0.5, 0.4]), torch.tensor([0.3, 0.1, 0.25])
    pixels = torch.rand(B, 3, 8, 8, generator=g)
    x = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # what the model is fed
    h, y = torch.randn(B, W, spatial, spatial, generator=g), torch.randint(0, C, (B,), generator=g)
    method = InfoPro()
    inf = info("cnn", 0, 2, input_shape=(3, 8, 8), image_norm=(tuple(mean.tolist()), tuple(std.tolist())))
    head = method.build_head(inf)
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        head.decoder[1].weight.uniform_(0.5, 1.5, generator=g)
        head.decoder[1].bias.uniform_(-0.5, 0.5, generator=g)
    z = h if spatial == 8 else F.interpolate(h, size=(8, 8), mode="bilinear", align_corners=True)
    c0, bn, c2 = head.decoder[0], head.decoder[1], head.decoder[3]
    hidden = torch.relu(batch_norm_train(F.conv2d(z, c0.weight, c0.bias, padding=1), bn))
    recon = F.conv2d(hidden, c2.weight, c2.bias, padding=1)
    assert recon.shape == x.shape
    expected = 5.0 * bce_of_sigmoid(recon, pixels) + 0.5 * ce(_cnn_classifier(head, h), y)
    torch.testing.assert_close(method.local_loss(head, h, y, x, inf), expected)


def test_infopro_rejects_an_image_normalisation_of_the_wrong_channel_count():
    from dist_train.errors import UserError
    with pytest.raises(UserError, match="2 channels"):
        InfoPro().build_head(info("cnn", 0, 2, input_shape=(3, 8, 8), image_norm=((0.1, 0.2), (1.0, 1.0))))


def test_infopro_gpt_reconstructs_the_input_bytes():
    g = torch.Generator().manual_seed(2)
    T = 5
    x = torch.randint(0, V, (B, T), generator=g)
    h, y = torch.randn(B, T, W, generator=g), torch.randint(0, V, (B, T), generator=g)
    method = InfoPro()
    inf = info("gpt", 1, 4)  # K=4, stage 1: λ1 = λ2 = ½
    head = method.build_head(inf)
    ln, lin = head.decoder
    byte_logits = F.layer_norm(h, (W,), ln.weight, ln.bias, ln.eps) @ lin.weight.T
    expected = 0.5 * ce(byte_logits, x) + 0.5 * ce(_gpt_classifier(head, h), y)
    torch.testing.assert_close(method.local_loss(head, h, y, x, inf), expected)


def test_infopro_reconstructs_x_not_the_received_activation():
    """A stage > 0 rebuilds the model input (its decoder outputs D = 64 values, not W)."""
    head = InfoPro().build_head(info("mlp", 1, 3, input_shape=(1, 8, 8)))
    assert head.decoder[-1].out_features == 64 != W
    head = InfoPro().build_head(info("cnn", 2, 4, input_shape=(3, 8, 8)))
    assert head.decoder[-1].out_channels == 3


# ---------------------------------------------------------------- AugLocal

# (d, τ, d_min, K) -> d_i for i = 0..K-2: d_i = max(d_min, round(d(1 - τ i/(K-2)) + d_min τ i/(K-2))),
# worked out by hand (round() as Python's: 2.5 -> 2).
AUGLOCAL_DEPTHS = {
    (3, 0.5, 1, 2): [3],
    (3, 0.5, 1, 4): [3, 2, 2],        # 3, 2.5 -> 2, 2
    (3, 0.5, 1, 5): [3, 3, 2, 2],     # 3, 2.67, 2.33, 2
    (5, 1.0, 1, 6): [5, 4, 3, 2, 1],  # falls to d_min
    (5, 1.0, 2, 6): [5, 4, 4, 3, 2],  # 5, 4.25, 3.5 -> 4, 2.75, 2
    (4, 0.0, 1, 4): [4, 4, 4],        # τ = 0: constant depth
}


def _mlp_blocks(n: int) -> nn.ModuleList:
    torch.manual_seed(0)
    return MLP(in_features=64, num_classes=C, n_layer=n, width=W).blocks


@pytest.mark.parametrize("key", list(AUGLOCAL_DEPTHS), ids=[str(k) for k in AUGLOCAL_DEPTHS])
def test_auglocal_depth_rule(key):
    d, tau, dmin, K = key
    blocks = _mlp_blocks(12)  # stage i gets blocks[i+1:] as its later ones: 11 - i >= d, never capped
    method = AugLocal(depth=d, decay=tau, min_depth=dmin)
    got = [len(method.build_head(info("mlp", i, K, later=blocks[i + 1:])).blocks) for i in range(K - 1)]
    assert got == AUGLOCAL_DEPTHS[key]


# (n later blocks, d) -> the sampled later blocks, j_s = round(n·s/d) - 1 (ties up), s = 1..d.
AUGLOCAL_SAMPLES = {
    (10, 5): [1, 3, 5, 7, 9],
    (6, 4): [1, 2, 4, 5],   # 1.5 -> 2, 3, 4.5 -> 5, 6
    (7, 3): [1, 4, 6],      # 2.33, 4.67, 7
    (5, 1): [4],            # depth 1: the last block
    (2, 3): [0, 1],         # d >= n: all of them
}


@pytest.mark.parametrize("key", list(AUGLOCAL_SAMPLES), ids=[str(k) for k in AUGLOCAL_SAMPLES])
def test_auglocal_uniform_sampling(key):
    n, d = key
    blocks = _mlp_blocks(n + 1)
    head = AugLocal(depth=d, min_depth=1).build_head(info("mlp", 0, 2, later=blocks[1:]))
    assert list(head.sampled) == AUGLOCAL_SAMPLES[key]


def test_auglocal_copies_are_fresh_and_the_loss_is_the_chain():
    blocks = _mlp_blocks(5)
    later = blocks[1:]
    head = AugLocal(depth=2).build_head(info("mlp", 0, 2, later=later))
    assert list(head.sampled) == [1, 3]
    for j, copy in zip(head.sampled, head.blocks):
        src = later[j]
        assert type(copy) is type(src)
        assert [(n, p.shape) for n, p in copy.named_parameters()] == [(n, p.shape) for n, p in src.named_parameters()]
        for p, q in zip(copy.parameters(), src.parameters()):
            assert p.data_ptr() != q.data_ptr() and p.requires_grad
        assert not torch.equal(copy.fc.weight, src.fc.weight)  # re-initialised, not copied
    # The loss is CE(out(b_3(b_1(h))), y), chained by hand on the copies' weights.
    g = torch.Generator().manual_seed(3)
    h, y = torch.randn(B, W, generator=g), torch.randint(0, C, (B,), generator=g)
    z = h
    for copy in head.blocks:
        z = torch.relu(linear(z, copy.fc))
    expected = ce(linear(z, head.out), y)
    torch.testing.assert_close(AugLocal(depth=2).local_loss(head, h, y, None, info("mlp", 0, 2)), expected)
    # Only the head's own tensors get gradients; the model's later blocks none.
    AugLocal().local_loss(head, h, y, None, info("mlp", 0, 2)).backward()
    assert all(p.grad is None for p in later.parameters())
    assert all(p.grad is not None for p in head.parameters())


def test_auglocal_copies_gpt_and_cnn_blocks():
    torch.manual_seed(0)
    gpt = GPT(vocab_size=V, n_layer=4, width=W, n_head=2, block_size=8)
    head = AugLocal(depth=2).build_head(info("gpt", 0, 2, later=gpt.blocks[1:]))
    assert list(head.sampled) == [1, 2]  # n = 3, d = 2: 1.5 -> 2, 3
    g = torch.Generator().manual_seed(4)
    h, y = torch.randn(B, 8, W, generator=g), torch.randint(0, V, (B, 8), generator=g)
    z = head.blocks[1](head.blocks[0](h))
    ln, lin = head.out
    expected = ce(F.layer_norm(z, (W,), ln.weight, ln.bias, ln.eps) @ lin.weight.T, y)
    torch.testing.assert_close(AugLocal().local_loss(head, h, y, None, info("gpt", 0, 2)), expected)
    for j, copy in zip(head.sampled, head.blocks):
        for p, q in zip(copy.parameters(), gpt.blocks[1 + j].parameters()):
            assert p.shape == q.shape and p.data_ptr() != q.data_ptr()
            if p.dim() >= 2:
                assert not torch.equal(p, q)
    cnn = CNN(in_channels=1, image_size=8, num_classes=C, n_layer=3, width=8)
    head = AugLocal(depth=1).build_head(info("cnn", 0, 2, later=cnn.blocks[1:], width=8))
    assert list(head.sampled) == [1] and not torch.equal(head.blocks[0].conv.weight, cnn.blocks[2].conv.weight)


# ---------------------------------------------------------------- tpSGD

def _projection_by_hand(k: int, rows: int, cols: int) -> torch.Tensor:
    """P_k: N(0, 1) from a CPU generator seeded with the module's base seed + stage index."""
    from dist_train.local.methods.tpsgd import BASE_SEED
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(BASE_SEED + k))


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "gpt"])
def test_tpsgd_loss_is_mse_to_the_projected_label(model_name):
    g = torch.Generator().manual_seed(5)
    inf = info(model_name, 1, 3)
    if model_name == "mlp":
        h, y = torch.randn(B, W, generator=g), torch.randint(0, C, (B,), generator=g)
        out = h
    elif model_name == "cnn":
        h, y = torch.randn(B, W, 4, 4, generator=g), torch.randint(0, C, (B,), generator=g)
        out = h.mean(dim=(2, 3))  # the named adaptation: the map pooled over space
    else:
        h, y = torch.randn(B, 5, W, generator=g), torch.randint(0, V, (B, 5), generator=g)
        out = h  # every position is an example
    method = TpSGD()
    head = method.build_head(inf)
    assert list(head.parameters()) == []  # no readout: the stage output itself meets the target
    P = _projection_by_hand(1, inf.num_classes, W)
    torch.testing.assert_close(head.projection, P)
    target = F.one_hot(y, inf.num_classes).float() @ P  # P·onehot(y), as a matmul
    expected = ((out - target) ** 2).mean()
    torch.testing.assert_close(method.local_loss(head, h, y, None, inf), expected)


def test_tpsgd_projection_fixed_across_calls_and_ranks_and_per_stage():
    torch.manual_seed(0)
    a = TpSGD().build_head(info("mlp", 0, 3))
    torch.manual_seed(1)  # another rank's RNG state: P does not depend on it
    torch.rand(7)
    b = TpSGD().build_head(info("mlp", 0, 3))
    c = TpSGD().build_head(info("mlp", 1, 3))
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, c.projection)
    assert "projection" in a.state_dict() and not a.projection.requires_grad
    # Fixed across calls: a training step on the stage leaves P as it was.
    h = torch.randn(B, W, requires_grad=True)
    y = torch.randint(0, C, (B,))
    before = a.projection.clone()
    TpSGD().local_loss(a, h, y, None, info("mlp", 0, 3)).backward()
    assert torch.equal(a.projection, before) and h.grad is not None


def test_tpsgd_dim_must_be_the_stage_width():
    from dist_train.errors import UserError
    TpSGD(dim=W).build_head(info("mlp", 0, 2))
    with pytest.raises(UserError, match="local.tpsgd.dim"):
        TpSGD(dim=W + 1).build_head(info("mlp", 0, 2))

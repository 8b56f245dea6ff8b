"""Reference models: shapes, causality, parameter counts, loss at init, and that they learn."""

from __future__ import annotations

import math

import pytest
import torch

from dist_train.config.schema import ModelSection
from dist_train.data.base import DataInfo
from dist_train.errors import UserError
from dist_train.models import CNN, GPT, MLP, build_model, count_parameters

LM_INFO = DataInfo(task="lm", vocab_size=256, input_shape=None, num_classes=None, train_size=1000, val_size=100)
IMG_INFO = DataInfo(task="classify", vocab_size=None, input_shape=(1, 8, 8), num_classes=10,
                    train_size=1000, val_size=100)


def small_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    args = dict(vocab_size=256, n_layer=2, width=32, n_head=4, block_size=16, dropout=0.0)
    args.update(kw)
    return GPT(**args)


def lm_batch(b: int = 4, t: int = 16, v: int = 256):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, v, (b, t), generator=g)
    y = torch.randint(0, v, (b, t), generator=g)
    return x, y


def img_batch(b: int = 16):
    g = torch.Generator().manual_seed(2)
    return torch.rand(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g)


def test_gpt_structure_and_shapes():
    model = small_gpt()
    x, _ = lm_batch()
    assert model.task == "lm"
    assert len(model.blocks) == 2
    h = model.embed(x)
    assert h.shape == (4, 16, 32)
    for block in model.blocks:
        h = block(h)
    logits = model.head(h)
    assert logits.shape == (4, 16, 256)
    # forward is exactly head(blocks(embed(idx))), so stages can be cut at any block boundary.
    torch.testing.assert_close(model(x), logits)
    # Shorter sequences work; longer than block_size is refused.
    assert model(x[:, :5]).shape == (4, 5, 256)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_is_causal():
    model = small_gpt().eval()
    x, _ = lm_batch(b=2)
    t = 9
    x2 = x.clone()
    x2[:, t] = (x2[:, t] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_gpt_weights_not_tied_and_init():
    model = small_gpt(n_layer=4)
    assert model.embed.tok.weight.data_ptr() != model.head.out.weight.data_ptr()
    assert abs(model.embed.tok.weight.std().item() - 0.02) < 0.002
    resid = model.blocks[0].attn.proj.weight.std().item()
    assert abs(resid - 0.02 / math.sqrt(8)) < 0.002


def test_gpt_parameter_count_and_flops():
    v, w, t, n_layer = 256, 32, 16, 2
    model = small_gpt()
    block = 12 * w * w + 13 * w
    expected = (v * w + t * w) + n_layer * block + (2 * w + w * v)
    assert count_parameters(model) == expected
    non_embedding = expected - (v * w + t * w)
    assert model.num_flops_per_token() == 6 * non_embedding + 12 * n_layer * 4 * (w // 4) * t


def test_mlp_and_cnn_parameter_counts_and_shapes():
    i, w, c, n_layer = 64, 16, 10, 3
    mlp = MLP(i, c, n_layer, w, 0.0)
    assert count_parameters(mlp) == (i * w + w) + n_layer * (w * w + w) + (w * c + c)
    cnn = CNN(1, 8, c, n_layer, w, 0.0)
    assert count_parameters(cnn) == (9 * w + w) + n_layer * (9 * w * w + w + 2 * w) + (w * c + c)
    x, _ = img_batch()
    for model in (mlp, cnn):
        assert model.task == "classify"
        assert len(model.blocks) == n_layer
        assert model(x).shape == (16, 10)
    # Conv blocks keep the spatial size, so any block boundary is a valid stage cut.
    h = cnn.embed(x)
    assert h.shape == (16, w, 8, 8)
    assert cnn.blocks[0](h).shape == h.shape
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in cnn.modules())


def test_build_model_dispatch_and_errors():
    gpt = build_model(ModelSection(name="gpt", n_layer=1, width=16, n_head=2, block_size=8), LM_INFO)
    assert isinstance(gpt, GPT) and gpt.vocab_size == 256 and gpt.block_size == 8
    mlp = build_model(ModelSection(name="mlp", n_layer=1, width=16), IMG_INFO)
    assert isinstance(mlp, MLP) and mlp.head.out_features == 10
    cnn = build_model(ModelSection(name="cnn", n_layer=1, width=12), IMG_INFO)
    assert isinstance(cnn, CNN)
    with pytest.raises(UserError):
        build_model(ModelSection(name="gpt"), IMG_INFO)
    with pytest.raises(UserError):
        build_model(ModelSection(name="mlp"), LM_INFO)


def test_loss_at_init_is_about_log_vocab():
    x, y = lm_batch()
    model = small_gpt()
    loss = model.loss(model(x), y)
    assert torch.isfinite(loss) and loss.ndim == 0
    assert abs(loss.item() - math.log(256)) < 0.1
    xi, yi = img_batch()
    for model in (MLP(64, 10, 2, 32, 0.0), CNN(1, 8, 10, 2, 16, 0.0)):
        loss = model.loss(model(xi), yi)
        assert torch.isfinite(loss) and abs(loss.item() - math.log(10)) < 0.5


def test_lm_loss_is_mean_over_tokens():
    # Mean of equal-sized slice means == global mean: what makes DP losses match 1-process ones.
    model = small_gpt()
    x, y = lm_batch(b=4)
    with torch.no_grad():
        full = model.loss(model(x), y)
        halves = [model.loss(model(x[i:i + 2]), y[i:i + 2]) for i in (0, 2)]
    torch.testing.assert_close(full, sum(halves) / 2)


@pytest.mark.parametrize("name", ["gpt", "mlp", "cnn"])
def test_one_step_lowers_loss(name):
    torch.manual_seed(0)
    if name == "gpt":
        model, (x, y) = small_gpt(), lm_batch()
    else:
        model = build_model(ModelSection(name=name, n_layer=2, width=16), IMG_INFO)
        x, y = img_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.loss(model(x), y)
    before.backward()
    opt.step()
    with torch.no_grad():
        after = model.loss(model(x), y)
    assert after.item() < before.item()


def test_cnn_on_32x32_rgb_shapes():
    """3-channel 32x32 input: the stem brings it to 8x8, so blocks cost what they cost on digits;
    a model built from the shapes32 data set runs on its batches and learns from one step."""
    from dist_train.config.schema import DataSection
    from dist_train.data import build_dataset

    ds = build_dataset(DataSection(name="shapes32", num_examples=200), block_size=64)
    torch.manual_seed(0)
    cnn = build_model(ModelSection(name="cnn", n_layer=2, width=16), ds.info)
    x, y = ds.get_batch("train", torch.arange(16))
    assert cnn.embed(x).shape == (16, 16, 8, 8)
    assert cnn(x).shape == (16, 10)
    w = 16
    # stem 3x3x3 conv (stride 2) + max-pool, then the same blocks and head as on digits
    assert count_parameters(cnn) == (27 * w + w) + 2 * (9 * w * w + w + 2 * w) + (w * 10 + 10)
    opt = torch.optim.AdamW(cnn.parameters(), lr=1e-2)
    before = cnn.loss(cnn(x), y)
    before.backward()
    opt.step()
    with torch.no_grad():
        assert cnn.loss(cnn(x), y).item() < before.item()

"""NoProp: the fixed label embedding and schedule, the posterior step, per-stage training for the GPT,
MLP and CNN, and an end-to-end chained classifier on digits."""

from __future__ import annotations

import math

import pytest
import torch

from dist_train.data.digits import DigitsDataset
from dist_train.local.method import StageInfo
from dist_train.local.methods.noprop import (NoProp, alpha_bar_schedule, label_embedding,
                                             posterior_coefficients)
from dist_train.models import MLP
from local_models import fit, make_batch, make_model, stage_info  # tests/ is on sys.path

torch.set_num_threads(1)  # shared 2-core machine; these models are tiny anyway


def test_label_embedding_and_schedule():
    u = label_embedding(10, 32)
    assert torch.equal(u, label_embedding(10, 32))  # same on every rank, no traffic
    assert torch.allclose(u.norm(dim=1), torch.full((10,), math.sqrt(32)))
    model = make_model("mlp", n_layer=2)
    method = NoProp()
    stages = [method.build_stage(model, b, i).net for i, b in (stage_info(model, "mlp", k, 2) for k in range(2))]
    assert torch.equal(stages[0].label_embedding, stages[1].label_embedding)  # independent of stage index
    assert torch.equal(stages[0].label_embedding, u)
    for steps in (1, 2, 3, 8):
        ab = alpha_bar_schedule(steps)
        assert ab.shape == (steps + 1,) and ab[0] == 0.0
        assert (ab[1:] > ab[:-1]).all() and 0.9 < ab[-1] < 1.0


@pytest.mark.parametrize("steps", [2, 3, 4])
def test_perfect_predictor_chain_lands_on_mean(steps):
    ab = alpha_bar_schedule(steps)
    a1, b1 = posterior_coefficients(ab, 1)
    assert b1 == 0.0 and a1 == pytest.approx(math.sqrt(ab[1]))
    u = torch.randn(5, 7, dtype=torch.float64)
    z = torch.zeros_like(u)
    for t in range(1, steps + 1):
        a, b = posterior_coefficients(ab, t)
        z = a * u + b * z
        assert torch.allclose(z, math.sqrt(ab[t]) * u, atol=1e-12)  # mean of q(z_t | y) at every step


def test_posterior_mean_matches_sampling():
    # Monte-Carlo check of the Bayes step itself: draw z_t ~ q(z_t | u), z_{t-1} from the noising
    # process, and regress z_t on (u, z_{t-1}); the least-squares coefficients are the posterior mean's.
    ab = alpha_bar_schedule(3)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    u = torch.randn(n, dtype=torch.float64, generator=g)
    for t in (2, 3):
        alpha = float(ab[t - 1] / ab[t])
        z_t = math.sqrt(ab[t]) * u + math.sqrt(1 - ab[t]) * torch.randn(n, dtype=torch.float64, generator=g)
        z_prev = math.sqrt(alpha) * z_t + math.sqrt(1 - alpha) * torch.randn(n, dtype=torch.float64, generator=g)
        coef = torch.linalg.lstsq(torch.stack([u, z_prev], 1), z_t[:, None]).solution.squeeze(1)
        a, b = posterior_coefficients(ab, t)
        assert coef[0].item() == pytest.approx(a, abs=0.01) and coef[1].item() == pytest.approx(b, abs=0.01)


CASES = [(model, stage) for model in ("gpt", "mlp", "cnn") for stage in (0, 1)]


@pytest.mark.parametrize("model_name,index", CASES, ids=[f"{n}-s{k}of2" for n, k in CASES])
def test_stage_trains(model_name, index):
    model = make_model(model_name)
    x, y = make_batch(model_name)
    info, blocks = stage_info(model, model_name, index, 2)
    method = NoProp()
    stage = method.build_stage(model, blocks, info).net
    assert (stage.classifier is not None) == (index == 1)

    def loss_at(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)  # the same z samples at start and end
        return method.loss(stage, x, y, info)

    loss = loss_at(7)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in stage.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    for block in stage.blocks:
        assert any(p.grad.abs().sum() > 0 for p in block.parameters())

    initial = loss.item()
    final = fit(stage.parameters(), loss_at)
    assert math.isfinite(final) and final < 0.9 * initial, (initial, final)

    # Inference shapes: z has u_y's shape; the last stage maps z_T to logits.
    with torch.no_grad():
        z = method.initial_z(x, info)
        assert z.shape == stage.target(y).shape and z.dtype == torch.float32
        z = method.denoise(stage, x, z, info)
        assert z.shape == stage.target(y).shape and torch.isfinite(z).all()
        if index == 1:
            logits = method.logits(stage, z, info)
            assert logits.shape == (*y.shape, info.num_classes)
        else:
            with pytest.raises(ValueError):
                method.logits(stage, z, info)


def test_not_an_auxiliary_head_method():
    model = make_model("mlp")
    info, _ = stage_info(model, "mlp", 0, 2)
    with pytest.raises(NotImplementedError):
        NoProp().build_head(info)


def test_digits_end_to_end_chain():
    ds = DigitsDataset(val_fraction=0.2)
    x_train, y_train = ds.get_batch("train", torch.arange(ds.num_samples("train")))
    x_val, y_val = ds.get_batch("val", torch.arange(ds.num_samples("val")))
    torch.manual_seed(0)
    model = MLP(in_features=64, num_classes=10, n_layer=2, width=64)
    method = NoProp()
    infos = [StageInfo(index=k, num_stages=2, task="classify", width=64, num_classes=10, later_blocks=(),
                       model_name="mlp") for k in range(2)]
    stages = [method.build_stage(model, range(k, k + 1), info).net for k, info in enumerate(infos)]
    opts = [torch.optim.Adam(s.parameters(), lr=3e-3) for s in stages]
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(y_train), (64,), generator=g)
        for stage, opt, info in zip(stages, opts, infos):  # independent losses: no activations shared
            opt.zero_grad(set_to_none=True)
            method.loss(stage, x_train[idx], y_train[idx], info).backward()
            opt.step()
    with torch.no_grad():
        z = method.initial_z(x_val, infos[0])
        for stage, info in zip(stages, infos):
            z = method.denoise(stage, x_val, z, info)
        acc = (method.logits(stages[-1], z, infos[-1]).argmax(-1) == y_val).float().mean().item()
    assert acc > 0.85, acc

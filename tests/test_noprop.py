"""NoProp: the fixed label embedding and schedule, the posterior step, per-stage training for the GPT,
MLP and CNN, and an end-to-end chained classifier on digits."""

from __future__ import annotations

import math

import pytest
import torch

from dist_train.data.digits import DigitsDataset
from dist_train.errors import UserError
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
    stages = [method.build_stage(model, b, i) for i, b in (stage_info(model, "mlp", k, 2) for k in range(2))]
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
    method = NoProp(steps=4)  # T = 4 over K = 2: two denoising steps per stage
    stage = method.build_stage(model, blocks, info)
    assert list(stage.steps) == ([1, 2] if index == 0 else [3, 4]) and len(stage.nets) == 2
    assert (stage.classifier is not None) == (index == 1)

    def loss_at(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)  # the same z samples at start and end
        return stage(x=x, y=y)

    loss = loss_at(7)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for net in stage.nets:  # every step's network learns
        for block in net.blocks:
            assert any(p.grad.abs().sum() > 0 for p in block.parameters())

    initial = loss.item()
    final = fit(stage.parameters(), loss_at)
    assert math.isfinite(final) and final < 0.9 * initial, (initial, final)

    # Inference shapes: z has u_y's shape; the last stage maps z_T to logits.
    with torch.no_grad():
        z = stage(x=x) if index == 0 else stage(x=x, received=method.initial_z(x, info))
        want = (*y.shape, info.num_classes) if index == 1 else stage.target(y).shape
        assert z.shape == want and torch.isfinite(z).all()


def test_loss_is_the_papers_snr_weighted_objective():
    """Eq. 8 of NoProp, recomputed here from its definition: stage k's loss is the sum over its steps
    of (eta/2)(SNR(t) - SNR(t-1)) ||u_hat_t(z_{t-1}, x) - u_y||^2, z_{t-1} ~ N(sqrt(ab_{t-1}) u_y,
    (1 - ab_{t-1}) I), plus -log p(y | z_T) with z_T ~ q(z_T | y) on the last stage."""
    model = make_model("mlp")
    x, y = make_batch("mlp")
    eta, T, cap = 0.3, 4, 0.95
    method = NoProp(steps=T, eta=eta, max_alpha_bar=cap)
    for index in (0, 1):
        info, blocks = stage_info(model, "mlp", index, 2)
        stage = method.build_stage(model, blocks, info)
        torch.manual_seed(3)
        got = stage(x=x, y=y)
        # By hand: the schedule, SNR, and the same noise draws in the same order.
        ab = [cap * math.sin(math.pi / 2 * t / T) ** 2 for t in range(T + 1)]
        snr = [a / (1 - a) for a in ab]
        u = stage.label_embedding[y]
        torch.manual_seed(3)
        want = torch.zeros(())
        for net, t in zip(stage.nets, (1, 2) if index == 0 else (3, 4)):
            z = math.sqrt(ab[t - 1]) * u + math.sqrt(1 - ab[t - 1]) * torch.randn_like(u)
            want = want + eta / 2 * (snr[t] - snr[t - 1]) * ((net(x, z) - u) ** 2).sum(1).mean()
        if index == 1:
            z_T = math.sqrt(ab[T]) * u + math.sqrt(1 - ab[T]) * torch.randn_like(u)
            logits = stage.classifier(z_T)
            want = want - torch.log_softmax(logits, 1)[torch.arange(len(y)), y].mean()
        assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_steps_must_divide_among_stages():
    model = make_model("mlp")
    info, blocks = stage_info(model, "mlp", 0, 2)
    with pytest.raises(UserError, match="local.noprop.steps"):
        NoProp(steps=3).build_stage(model, blocks, info)


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
    stages = [method.build_stage(model, range(k, k + 1), info) for k, info in enumerate(infos)]
    opts = [torch.optim.Adam(s.parameters(), lr=3e-3) for s in stages]
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(y_train), (64,), generator=g)
        for stage, opt in zip(stages, opts):  # independent losses: no activations shared
            opt.zero_grad(set_to_none=True)
            stage(x=x_train[idx], y=y_train[idx]).backward()
            opt.step()
    with torch.no_grad():
        z = None
        for stage in stages:
            z = stage(x=x_val, received=z)
        acc = (z.argmax(-1) == y_val).float().mean().item()
    assert acc > 0.85, acc

"""DIFF2 (arXiv 2302.03884) against its recursion written out here with a per-example autograd loop
(fp64, rtol 1e-10), T = 1 against DP-GD, and the closed-form noise against the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cli_helpers import forked_ranks
from dist_train.data.sampler import derive_seed
from dist_train.privacy.diff2 import Diff2, calibrated_sigmas, closed_form_sigmas, diff2_epsilon

ROUNDS, LR, C1, C2, S1, S2, SEED = 7, 0.1, 0.8, 3.0, 0.05, 0.2, 5


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    return model, x, y


def _loss(out, y):
    return ((out - y) ** 2).sum() / 2


def _reference(model, x, y, period):
    """The paper's rounds, spelled out: per-example gradients one at a time, flat clipping."""
    params = list(model.parameters())
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in params])  # noqa: E731

    def grads_at(vec):
        saved = flat()
        _assign(params, vec)
        out = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(_loss(model(x[i:i + 1]), y[i:i + 1]), params)])
               for i in range(x.size(0))]
        _assign(params, saved)
        return out

    def clip(u, c):
        return u * min(1.0, c / (float(u.norm()) + 1e-6))

    prev, v, history = None, None, []
    for r in range(ROUNDS):
        cur = flat()
        g = torch.Generator().manual_seed(derive_seed(SEED, r, 0x44494632))
        noise = torch.randn(cur.shape, generator=g, dtype=torch.float64)
        if r % period == 0:
            v = sum(clip(gi, C1) for gi in grads_at(cur)) / x.size(0) + C1 * S1 * noise
        else:
            radius = C2 * float((cur - prev).norm())
            diffs = [a - b for a, b in zip(grads_at(cur), grads_at(prev))]
            v = v + sum(clip(di, radius) for di in diffs) / x.size(0) + radius * S2 * noise
        prev = cur
        _assign(params, cur - LR * v)
        history.append(flat())
    return history


def _assign(params, vec):
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(vec[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def _run(model, x, y, period):
    opt = Diff2(model, _loss, LR, period, C1, C2, S1, S2, seed=SEED)
    out = []
    for r in range(ROUNDS):
        opt.step(x, y, r)
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return out


def test_diff2_matches_the_recursion():
    for period in (3, 1):  # T = 1: every round restarts, i.e. DP-GD
        model, x, y = _setup()
        ref_model, _, _ = _setup()
        got, want = _run(model, x, y, period), _reference(ref_model, x, y, period)
        for r, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"T={period} round {r}")


def test_a_difference_round_reuses_the_last_rounds_gradients():
    """Same data every round: one per-example gradient pass per round, not two (a difference round's
    gradients at x_(r-1) are the last round's, taken at that iterate), with the iterates of the
    recursion above. Other data, or a state just loaded, has them computed afresh."""
    model, x, y = _setup()
    ref_model, _, _ = _setup()
    opt = Diff2(model, _loss, LR, 3, C1, C2, S1, S2, seed=SEED)
    calls: list[torch.Tensor] = []
    original = opt._per_example_grads

    def counted(flat, xs, ys):
        calls.append(flat.clone())
        return original(flat, xs, ys)

    opt._per_example_grads = counted
    got = []
    for r in range(ROUNDS):
        opt.step(x, y, r)
        got.append(torch.cat([q.detach().reshape(-1) for q in model.parameters()]))
    assert len(calls) == ROUNDS
    for r, (a, b) in enumerate(zip(got, _reference(ref_model, x, y, 3))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"round {r}")
    assert ROUNDS % 3 != 0  # so the next round is a difference round
    calls.clear()
    opt.step(x, y + 1.0, ROUNDS)  # other targets: x_(r-1)'s gradients on them are not known yet
    assert len(calls) == 2 and torch.equal(calls[1], got[-2])
    calls.clear()
    opt.load_state_dict(opt.state_dict())
    opt.step(x, y, ROUNDS + 1)
    assert len(calls) == 2


def test_period_one_is_dp_gd():
    """T = 1 against DP-GD written directly: x <- x - lr (mean_i clip_C1(g_i) + C1 sigma1 noise)."""
    model, x, y = _setup()
    got = _run(model, x, y, 1)
    ref, _, _ = _setup()
    params = list(ref.parameters())
    for r in range(ROUNDS):
        per = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(_loss(ref(x[i:i + 1]), y[i:i + 1]), params)])
               for i in range(x.size(0))]
        mean = sum(p * min(1.0, C1 / (float(p.norm()) + 1e-6)) for p in per) / x.size(0)
        g = torch.Generator().manual_seed(derive_seed(SEED, r, 0x44494632))
        step = mean + C1 * S1 * torch.randn(mean.shape, generator=g, dtype=torch.float64)
        _assign(params, torch.cat([p.detach().reshape(-1) for p in params]) - LR * step)
        torch.testing.assert_close(got[r], torch.cat([p.detach().reshape(-1) for p in params]), rtol=1e-10, atol=1e-12)


def test_closed_form_noise():
    eps, delta, n, P, R = 3.0, 1e-5, 1651, 10, 2000
    alpha = int(1 + math.ceil(2 * math.log(1 / delta) / eps))
    for T in (1, 12):
        s1, s2 = closed_form_sigmas(eps, delta, n, P, R, T)
        c1 = 4 * 1.25 if T > 1 else 4
        assert s1 == math.sqrt(c1 * alpha * R / (T * n * n * P * P * eps))
        assert s2 == math.sqrt((4 * 1.25 / 0.25) * alpha * R / (n * n * P * P * eps))


def _worker(rank: int, world: int, out: str, period: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")  # env:// variables from run_on_ranks
    model, x, y = _setup()
    opt = Diff2(model, _loss, LR, period, C1, C2, S1, S2, seed=SEED, process_group=dist.group.WORLD)
    shard = slice(rank * 6, rank * 6 + 6)
    for r in range(ROUNDS):
        opt.step(x[shard], y[shard], r)
    torch.save(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), f"{out}/rank{rank}.pt")
    dist.barrier()  # leave together; run_on_ranks tears the group down


def test_two_workers_match_one_process(tmp_path):
    """P = 2 gloo ranks holding 6 examples each == one process on all 12 (equal n_p: the mean of the
    workers' means is the mean over all examples); fp64, rtol 1e-10 (only the sum order differs)."""
    forked_ranks(_worker, 2, (str(tmp_path), 3))
    model, x, y = _setup()
    want = _run(model, x, y, 3)[-1]
    for r in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{r}.pt"), want, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ noise and accounting
PAPER = {"n": 1651, "workers": 10, "rounds": 2000, "delta": 1e-5}  # the setting of Murata & Suzuki's experiments


@pytest.mark.parametrize("epsilon", [3.0, 5.0])
@pytest.mark.parametrize("period", [1, 10])
def test_closed_form_meets_the_papers_rdp_bound_by_hand(epsilon, period):
    """The authors' argument, recomputed here: at alpha = int(1 + ceil(2 ln(1/delta)/eps)) the
    composed RDP of the R Gaussian releases (sensitivity 2C/(nP), std C sigma) plus
    ln(1/delta)/(alpha - 1) is at most epsilon."""
    n, P, R, delta = PAPER["n"], PAPER["workers"], PAPER["rounds"], PAPER["delta"]
    s1, s2 = closed_form_sigmas(epsilon, delta, n, P, R, period)
    alpha = int(1 + math.ceil(2 * math.log(1 / delta) / epsilon))
    restarts = math.ceil(R / period)
    rdp = restarts * alpha * (2 / (n * P)) ** 2 / (2 * s1 ** 2) + \
        (R - restarts) * alpha * (2 / (n * P)) ** 2 / (2 * s2 ** 2)
    assert rdp + math.log(1 / delta) / (alpha - 1) <= epsilon * (1 + 1e-12)


def test_tight_accountant_leaves_part_of_epsilon_unused():
    """With P = 10, n = 1651, R = 2000, delta = 1e-5, eps = 3, a tight RDP accountant gives
    eps ~ 2.54 for the closed-form noise (DP-GD, T = 1)."""
    s1, s2 = closed_form_sigmas(3.0, PAPER["delta"], PAPER["n"], PAPER["workers"], PAPER["rounds"], 1)
    eps = diff2_epsilon(s1, s2, PAPER["n"], PAPER["workers"], PAPER["rounds"], 1, PAPER["delta"])
    assert eps == pytest.approx(2.54, abs=0.01)


@pytest.mark.parametrize("period", [1, 10])
def test_calibrated_noise_is_smaller_at_the_same_guarantee(period):
    args = (PAPER["n"], PAPER["workers"], PAPER["rounds"], period)
    s1, s2 = closed_form_sigmas(3.0, PAPER["delta"], *args)
    c1, c2 = calibrated_sigmas(3.0, PAPER["delta"], *args)
    assert c1 / s1 == pytest.approx(c2 / s2, rel=1e-12) and c1 < 0.9 * s1  # one common factor, >10% less
    eps = diff2_epsilon(c1, c2, *args, PAPER["delta"])
    assert 3.0 - 1e-3 < eps <= 3.0


def test_data_refilled_in_place_is_not_taken_for_the_same():
    """The kept gradients belong to the data as it was: a caller that overwrites its batch buffer
    in place gets the gradients at x_(r-1) recomputed on the new contents."""
    model, x, y = _setup()
    opt = Diff2(model, _loss, LR, 3, C1, C2, S1, S2, seed=SEED)
    calls: list[int] = []
    original = opt._per_example_grads
    opt._per_example_grads = lambda flat, xs, ys: calls.append(1) or original(flat, xs, ys)
    opt.step(x, y, 0)
    y.add_(1.0)  # the same tensor object, other targets
    opt.step(x, y, 1)
    assert len(calls) == 3

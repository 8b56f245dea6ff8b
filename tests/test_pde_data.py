"""The Fisher–KPP workload (dist_train/pde/fisher_kpp.py, dist_train/pde/data.py): the reference solver
against closed forms (heat equation, logistic ODE), its order of convergence, the initial-condition
family, and the data set's splits."""

from __future__ import annotations

import math

import pytest
import torch

from dist_train.errors import UserError
from dist_train.pde.data import PDEDataset
from dist_train.pde.fisher_kpp import initial_conditions, solve_reference
from dist_train.pde.grid import PDEGrid


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_grid_properties():
    grid = PDEGrid(nx=65, nt=33, t_end=2.0, nu=0.1, rho=1.0)
    assert grid.dx == pytest.approx(1 / 64) and grid.dt == pytest.approx(2 / 32)
    assert grid.x.dtype == grid.t.dtype == torch.float64
    assert grid.x.shape == (65,) and grid.t.shape == (33,)
    assert grid.x[-1].item() == 1.0 and grid.t[-1].item() == 2.0


def test_heat_equation_matches_sine_series():
    # rho = 0 leaves u_t = nu u_xx, whose sine modes decay as exp(-nu (k pi)^2 t).
    grid = PDEGrid(nx=65, nt=33, t_end=1.0, nu=0.05, rho=0.0)
    x, t = grid.x, grid.t[:, None]
    u0 = torch.sin(math.pi * x) + 0.5 * torch.sin(3 * math.pi * x)
    u0[0] = u0[-1] = 0.0
    exact = (torch.exp(-grid.nu * math.pi**2 * t) * torch.sin(math.pi * x)
             + 0.5 * torch.exp(-9 * grid.nu * math.pi**2 * t) * torch.sin(3 * math.pi * x))
    got = solve_reference(u0[None], grid)
    assert got.shape == (1, 33, 65) and got.dtype == torch.float64
    assert _rel_l2(got[0], exact) < 1e-3


def test_pure_reaction_is_exact_logistic():
    # nu = 0: every point follows u' = rho u (1 - u) on its own; the split's reaction steps are exact.
    grid = PDEGrid(nx=33, nt=17, t_end=2.0, nu=0.0, rho=1.5)
    x = grid.x
    u0 = torch.stack([0.9 * torch.sin(math.pi * x) ** 2, 0.5 * x * (1 - x), 4 * x * (1 - x)])
    u0[:, 0] = u0[:, -1] = 0.0
    grow = torch.exp(grid.rho * grid.t)[None, :, None]
    exact = u0[:, None] * grow / (1 - u0[:, None] + u0[:, None] * grow)
    got = solve_reference(u0, grid)
    assert (got - exact).abs().max().item() < 1e-10


def _bump(nx: int) -> torch.Tensor:
    x = torch.linspace(0.0, 1.0, nx, dtype=torch.float64)
    u0 = 0.8 * torch.sin(math.pi * x) * torch.exp(-(x - 0.4) ** 2 / (2 * 0.1**2))
    u0[0] = u0[-1] = 0.0
    return u0[None]


def test_second_order_convergence():
    # Doubling nx and substeps together halves h and tau: a 2nd-order scheme's error drops ~4x.
    # The reference is the same scheme on a 16x finer grid (its own error is ~1/256 of the coarsest).
    nu, rho, nt = 0.02, 2.0, 11
    fine = solve_reference(_bump(513), PDEGrid(513, nt, 1.0, nu, rho), refine_x=1, substeps=32)
    errors = []
    for nx, substeps in ((17, 1), (33, 2), (65, 4)):
        got = solve_reference(_bump(nx), PDEGrid(nx, nt, 1.0, nu, rho), refine_x=1, substeps=substeps)
        errors.append(_rel_l2(got, fine[:, :, ::512 // (nx - 1)]))
    assert errors[0] / errors[1] > 2.5 and errors[1] / errors[2] > 2.5, errors
    assert errors[2] < 1e-3, errors


def test_initial_conditions():
    u0 = initial_conditions(200, 128, torch.Generator().manual_seed(3))
    assert u0.shape == (200, 128) and u0.dtype == torch.float64
    assert (u0[:, 0] == 0).all() and (u0[:, -1] == 0).all()
    assert u0.max().item() <= 0.95 and u0.min().item() >= 0.0
    assert (u0.amax(dim=1) > 0.05).all()  # no degenerate (all but zero) example
    assert len({tuple(row.tolist()) for row in u0}) == 200
    again = initial_conditions(200, 128, torch.Generator().manual_seed(3))
    assert torch.equal(u0, again)
    other = initial_conditions(200, 128, torch.Generator().manual_seed(4))
    assert not torch.allclose(u0, other)


@pytest.mark.parametrize("nx,nt,nu,rho", [(128, 64, 0.005, 1.0), (65, 33, 0.01, 3.0)])
def test_solution_stays_in_unit_interval(nx: int, nt: int, nu: float, rho: float):
    grid = PDEGrid(nx=nx, nt=nt, t_end=1.0, nu=nu, rho=rho)
    u = solve_reference(initial_conditions(32, nx, torch.Generator().manual_seed(0)), grid)
    assert u.min().item() >= -1e-9 and u.max().item() <= 1 + 1e-9
    assert torch.isfinite(u).all()


SMALL = PDEGrid(nx=32, nt=16, t_end=1.0, nu=0.005, rho=1.0)


def test_dataset_splits_and_batches():
    data = PDEDataset(SMALL, num_examples=40, seed=1, val_fraction=0.1, test_fraction=0.2)
    info = data.info
    assert info.task == "pde" and info.input_shape == (32,)
    assert (info.train_size, info.val_size, info.test_size) == (28, 4, 8)
    assert data.grid == SMALL and data.sampling == "epochs"
    rows = {}
    for split in ("train", "val", "test"):
        n = data.num_samples(split)
        assert n == getattr(info, f"{split}_size")
        u0, u = data.get_batch(split, torch.arange(n))
        assert u0.shape == (n, 32) and u.shape == (n, 16, 32)
        assert u0.dtype == u.dtype == torch.float32
        assert torch.equal(u[:, 0], u0)  # the target starts from the input
        rows[split] = {tuple(r.tolist()) for r in u0}
    assert sum(len(r) for r in rows.values()) == 40  # no identical u0 in two splits (or within one)
    u0, u = data.get_batch("val", torch.tensor([2, 0]))
    expected = solve_reference(u0.double(), SMALL)
    assert (u.double() - expected).abs().max().item() < 1e-5
    # Training batches walk a seeded permutation of the 28 training examples: 3 steps of 8 draw 24
    # distinct ones; the seed sets the order; a batch larger than the split is refused.
    sampler = data.sampler("train", seed=0, global_batch=8)
    drawn = torch.cat([sampler.next_indices() for _ in range(3)]).tolist()
    assert len(set(drawn)) == 24 and all(0 <= i < 28 for i in drawn)
    assert data.sampler("train", seed=0, global_batch=8).next_indices().tolist() == drawn[:8]
    assert data.sampler("train", seed=1, global_batch=8).next_indices().tolist() != drawn[:8]
    with pytest.raises(UserError, match="fewer than one global batch"):
        data.sampler("train", seed=0, global_batch=29)


def test_dataset_is_deterministic():
    a = PDEDataset(SMALL, num_examples=20, seed=7, val_fraction=0.2, test_fraction=0.1)
    b = PDEDataset(SMALL, num_examples=20, seed=7, val_fraction=0.2, test_fraction=0.1)
    c = PDEDataset(SMALL, num_examples=20, seed=8, val_fraction=0.2, test_fraction=0.1)
    idx = torch.arange(a.num_samples("train"))
    for x, y in zip(a.get_batch("train", idx), b.get_batch("train", idx)):
        assert torch.equal(x, y)
    assert not torch.equal(a.get_batch("train", idx)[0], c.get_batch("train", idx)[0])


def test_dataset_without_test_split():
    data = PDEDataset(SMALL, num_examples=10, seed=0, val_fraction=0.01, test_fraction=0.0)
    assert (data.info.train_size, data.info.val_size, data.info.test_size) == (9, 1, 0)
    with pytest.raises(ValueError):
        data.get_batch("test", torch.tensor([0]))
    with pytest.raises(ValueError):
        PDEDataset(SMALL, num_examples=2, seed=0, val_fraction=0.1, test_fraction=0.1)

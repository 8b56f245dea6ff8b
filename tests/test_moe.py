"""Hard-constraint experts: the domain split, the physics loss against the constraint's own rows, the
assembled piecewise solution, and W gloo ranks against all experts in one process."""

from __future__ import annotations

import pytest
import torch

import moe_cases as mc
from cli_helpers import forked_ranks
from dist_train.errors import UserError
from dist_train.pde.constraint import FisherKPP, solve_hard_constraint
from dist_train.pde.domain import constraint_points, decompose, owner_of, points_per_expert
from dist_train.pde.grid import PDEGrid
from dist_train.pde.physics import grid_residual

# Both sides do the same float64 arithmetic except that the basis network sees batch slices, whose
# matmuls round differently (~1e-16); the constrained solve (ridge 1e-4) amplifies that by its
# condition number, measured ~1e-8 relative on loss and u. The negative control below moves the
# loss by far more than this tolerance.
RTOL = 1e-6


@pytest.mark.parametrize("experts,splits,overlap", [(1, 1, 0), (4, 1, 0), (5, 1, 0), (6, 2, 0), (4, 1, 3), (6, 2, 2)])
def test_sub_domains_tile_the_grid_and_halos_hold_the_stencils(experts, splits, overlap) -> None:
    grid = mc.GRID
    subs = decompose(grid, experts, splits, overlap)
    cover = torch.zeros(grid.nt, grid.nx, dtype=torch.int64)
    for s in subs:
        cover[s.t0:s.t1, s.x0:s.x1] += 1
        # the constrained region: the own columns widened by the overlap on either side, within the grid
        assert (s.cx0, s.cx1) == (max(s.x0 - overlap, 0), min(s.x1 + overlap, grid.nx))
        eligible = (s.t1 - max(s.t0, 1)) * (min(s.cx1, grid.nx - 1) - max(s.cx0, 1))
        pts = constraint_points(s, grid, eligible // 2, seed=0)
        tb, xb = s.halo_shape
        pts.validate(tb, xb)  # every residual stencil inside the expert's block with halo
        # global positions of the residual points lie in the constrained region, interior of the domain
        j, i = pts.pde_j + s.ht0, pts.pde_i + s.hx0
        assert ((j >= max(s.t0, 1)) & (j < s.t1) & (i >= max(s.cx0, 1)) & (i < min(s.cx1, grid.nx - 1))).all()
        if overlap and 0 < s.x0:  # a draw this size reaches into the widened part
            assert (i < s.x0).any() or (i >= s.x1).any()
        assert (pts.ic_j + s.ht0 == 0).all() and len(pts.ic_j) == (s.cx1 - s.cx0 if s.t0 == 0 else 0)
        bc = pts.bc_i + s.hx0
        assert ((bc == 0) | (bc == grid.nx - 1)).all()
        assert len(bc) == (s.t1 - max(s.t0, 1)) * ((s.cx0 == 0) + (s.cx1 == grid.nx))
    assert (cover == 1).all()  # every grid point belongs to exactly one expert
    assert sum(points_per_expert(10, experts)) == 10
    assert [owner_of(k, 2) for k in range(experts)] == [k % 2 for k in range(experts)]


def test_too_many_experts_or_points_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="moe.experts: 16 sub-domains in space do not fit the 15 interior columns"):
        decompose(mc.GRID, 16)
    with pytest.raises(UserError, match="moe.time_splits: 3 does not divide moe.experts=4"):
        decompose(mc.GRID, 4, 3)
    with pytest.raises(UserError, match="moe.overlap: 17 columns must be at least 0 and below the grid's 17"):
        decompose(mc.GRID, 4, overlap=17)
    with pytest.raises(UserError, match="moe.points: expert 0 would need 500 residual points"):
        constraint_points(decompose(mc.GRID, 4)[0], mc.GRID, 500)


def test_physics_residual_equals_the_constraint_rows() -> None:
    # Two codings of the same Crank–Nicolson residual: on a whole u grid (the loss) and on stencil
    # rows of the basis (the constraint). u = b·ω must give the same value at every point.
    grid = PDEGrid(nx=11, nt=7, t_end=0.3, nu=0.02, rho=1.5)
    g = torch.Generator().manual_seed(3)
    b = torch.randn(2, grid.nt, grid.nx, 5, generator=g, dtype=torch.float64)
    omega = torch.randn(2, 5, generator=g, dtype=torch.float64) * 0.3
    j, i = torch.meshgrid(torch.arange(1, grid.nt), torch.arange(1, grid.nx - 1), indexing="ij")
    pde = FisherKPP(nu=grid.nu, rho=grid.rho, dt=grid.dt, dx=grid.dx)
    rows, _ = pde.residual_and_jacobian(pde.gather(b, j.flatten(), i.flatten()), omega)
    u = torch.einsum("btxn,bn->btx", b, omega)
    torch.testing.assert_close(grid_residual(u, grid).flatten(1), rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("overlap", [0, 3])
def test_assembled_solution_is_each_experts_own_solve(overlap) -> None:
    m = mc.model(4, 2, overlap)
    u0, _ = mc.batch()
    with torch.no_grad():
        b = m.basis(u0)
        u = m(u0)
    for k, s in enumerate(m.experts.subs):
        block = b[:, s.ht0:s.t1, s.hx0:s.hx1]
        omega, info = solve_hard_constraint(block, u0[:, s.ic_columns()], m.experts.points[k], m.experts.pde,
                                            m.experts.options)
        rows, cols = s.own_in_halo()
        want = torch.einsum("btxn,bn->btx", block[:, rows, cols], omega)
        torch.testing.assert_close(u[:, s.t0:s.t1, s.x0:s.x1], want, rtol=1e-12, atol=1e-12)
        assert info.unconverged == 0


def test_experts_beat_one_global_constraint_on_the_constrained_residual() -> None:
    # More experts = more coefficients for the same basis: the grid residual at the solution is
    # smaller than with one global ω (the premise of the mixture, checked on an untrained basis).
    u0, _ = mc.batch()
    with torch.no_grad():
        res = {k: float(grid_residual(mc.model(k, 1)(u0), mc.GRID).abs().mean()) for k in (1, 4)}
    assert res[4] < res[1]


@pytest.mark.parametrize("world,ep", [(2, None), (4, None), (4, 2)])
def test_ranks_match_all_experts_in_one_process(world, ep, tmp_path) -> None:
    # ep = 2 on 4 ranks: two expert groups {0, 1} and {2, 3} of the mesh's "ep" dimension, each with
    # all K experts; the result must still be the one-process one.
    forked_ranks(mc.worker, world, (str(tmp_path), ep))
    got = torch.load(tmp_path / "results.pt", weights_only=False)
    group = ep or world  # rank 0's expert group
    for case in mc.CASES:
        u0, ref = mc.batch(mc.equation_of(case))
        loss, grads, u = mc.loss_and_grads(mc.model(*case), u0, ref)
        where = f"W={world} ep={group} experts/time_splits/overlap[/equation]={case}"
        assert got[case]["group"] == list(range(group)), where
        assert got[case]["loss"] == pytest.approx(loss, rel=RTOL), where
        torch.testing.assert_close(got[case]["u"], u, rtol=RTOL, atol=1e-10, msg=where)
        for name, g in grads.items():
            assert g.abs().max() > 0, f"{where}: {name} got no gradient"
            torch.testing.assert_close(got[case]["grads"][name], g, rtol=RTOL, atol=1e-10, msg=f"{where}: {name}")
        if case[0] > 1:  # rank 0 owns experts 0, ep, 2 ep, ...
            assert got[case]["owned"] == list(range(0, case[0], group)), where


def test_comparison_detects_a_different_placement_of_points(tmp_path) -> None:
    # Negative control: a different point draw changes loss and gradients beyond the tolerance.
    u0, ref = mc.batch()
    a = mc.loss_and_grads(mc.model(4, 1), u0, ref)
    other = mc.model(4, 1)
    other.experts.points = [constraint_points(s, mc.GRID, len(p.pde_j), seed=7)
                            for s, p in zip(other.experts.subs, other.experts.points)]
    b = mc.loss_and_grads(other, u0, ref)
    assert abs(a[0] - b[0]) > 100 * RTOL * abs(a[0])  # measured: 2.6e-4 relative


def test_non_finite_basis_values_give_a_flagged_nan_not_an_exception() -> None:
    # Raising inside the expert exchange would leave the other ranks waiting; the NaN instead reaches
    # the loss, where the run's non-finite guard stops or skips the step on every rank alike.
    m = mc.model(2, 1)
    u0, ref = mc.batch()
    real = m.basis.forward
    m.basis.forward = lambda x: real(x).index_fill(2, torch.tensor([1]), float("nan"))  # column 1: expert 0
    u = m(u0)
    loss = m.loss(u, ref)
    loss.backward()
    assert not torch.isfinite(loss)
    s = m.experts.subs
    assert torch.isnan(u[:, :, s[0].x0:s[0].x1]).all() and torch.isfinite(u[:, :, s[1].x0:s[1].x1]).all()
    assert m.experts.stats()["lm_nonfinite_inputs"] == 1

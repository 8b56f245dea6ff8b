"""PDEBench's diffusion–sorption problem (`dist_train.pde.sorption`) and its hard-constraint
rows (`constraint.DiffusionSorption`): the reference solver against exact solutions, the rows and
their derivatives against formulas written here, the implicit gradient against finite differences with
the inflow (u = 1) and outflow (Robin) rows in the problem."""

from __future__ import annotations

import math

import pytest
import torch

from dist_train.pde import sorption as ds
from dist_train.pde.constraint import (ConstraintPoints, DiffusionSorption, LMOptions, full_hessian,
                                       solve_hard_constraint)
from dist_train.pde.data import PDEDataset
from dist_train.pde.domain import constraint_points, decompose
from dist_train.pde.grid import PDEGrid, boundary_rows
from dist_train.pde.physics import boundary_residual, grid_residual
from moe_cases import ift_and_finite_differences
from test_hard_constraint import _one_thread  # noqa: F401  (autouse: these problems are tiny, one thread)

F64 = torch.float64
# PDEBench's constants, restated: A = (1 - phi)/phi * rho_s * k * n_f
A = (1 - 0.29) / 0.29 * 2880 * 3.5e-4 * 0.874
N_F = 0.874


FLOOR = 1e-3


def _soft_floor(v):
    """The smooth maximum of v and 1e-3 the module documents, restated (float or tensor)."""
    return (v + FLOOR + ((v - FLOOR) ** 2 + FLOOR ** 2) ** 0.5) / 2


def _retardation(v: float) -> float:
    return 1 + A * _soft_floor(v) ** (N_F - 1)


def test_retardation_is_smooth_through_its_floor_and_its_derivatives_are_rs() -> None:
    u = torch.cat([torch.linspace(-0.01, 0.01, 201, dtype=F64), torch.linspace(0.01, 1.0, 100, dtype=F64)])
    s = _soft_floor(u)
    hard = torch.clamp(u, min=FLOOR)
    assert bool((s >= hard).all()) and bool((s <= hard + FLOOR / 2 + 1e-15).all())
    assert float(((s - u) / u)[u >= 0.01].max()) < 3e-3  # ≈ FLOOR²/(4u²): R is PDEBench's away from u = 0
    r, r1, r2 = ds.retardation_derivatives(u)
    torch.testing.assert_close(r, torch.tensor([_retardation(float(v)) for v in u], dtype=F64), rtol=1e-13, atol=0)
    for k, v in enumerate(u):  # R' and R'' by autograd of R itself, point by point
        x = v.clone().requires_grad_(True)
        (d1,) = torch.autograd.grad(ds.retardation(x), x, create_graph=True)
        (d2,) = torch.autograd.grad(d1, x)
        torch.testing.assert_close(r1[k], d1.detach(), rtol=1e-11, atol=1e-9)
        torch.testing.assert_close(r2[k], d2, rtol=1e-10, atol=1e-6)
    # No jump of R' at the floor: over steps of 1e-6 across it R' moves by < 1% of its size there (the
    # hard max(u, 1e-3) jumped from ~650 to 0 however fine the steps).
    near = FLOOR + torch.linspace(-1e-4, 1e-4, 201, dtype=F64)
    slope = ds.retardation_derivatives(near)[1]
    assert float((slope[1:] - slope[:-1]).abs().max()) < 0.01 * float(slope.abs().max())


def test_linear_profile_is_steady_with_sorption() -> None:
    # u = 1 - x/(1 - D) meets u(0) = 1 and u(1) = D u_x(1) and has u_xx = 0: steady whatever R(u) is.
    grid = PDEGrid(nx=65, nt=6, t_end=500.0, nu=5e-4, rho=0.0, equation="diffusion_sorption")
    steady = (1 - grid.x / (1 - grid.nu))[None]
    got = ds.solve_reference(steady, grid)
    torch.testing.assert_close(got, steady[:, None].expand_as(got), rtol=0, atol=1e-12)


def _eigenmode_error(nx: int) -> float:
    # Without sorption (R = 1) u = s(x) + a e^{-D lam^2 t} sin(lam x), s the steady profile, solves the
    # problem when sin(lam) = D lam cos(lam) (the outflow condition on the mode): found by bisection.
    d, a = 0.0015, 0.3
    lo, hi = math.pi, 1.5 * math.pi
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.sin(mid) - d * mid * math.cos(mid) > 0 else (lo, mid)
    lam = (lo + hi) / 2
    grid = PDEGrid(nx=nx, nt=7, t_end=120.0, nu=d, rho=0.0, equation="diffusion_sorption")
    x, t = grid.x, grid.t[:, None]
    exact = (1 - x / (1 - d)) + a * torch.exp(-d * lam**2 * t) * torch.sin(lam * x)
    got = ds.solve_reference(exact[:1], grid, sorption=0.0)[0]
    return float((got - exact).norm() / exact.norm())


@pytest.mark.slow
def test_without_sorption_the_solver_follows_the_exact_decaying_mode() -> None:
    coarse, fine = _eigenmode_error(65), _eigenmode_error(129)
    assert coarse < 1e-4 and fine < 0.5 * coarse, (coarse, fine)  # measured 2.6e-5 and 6.5e-6


def test_data_set_is_bounded_and_enters_from_the_left() -> None:
    grid = PDEGrid(nx=64, nt=16, t_end=500.0, nu=5e-4, rho=0.0, equation="diffusion_sorption")
    data = PDEDataset(grid, 24, seed=0, val_fraction=0.25)
    u0, u = data._splits["train"]
    assert float(u0.min()) >= 0 and float(u0.max()) <= 0.2 + 1e-6
    assert float(u.min()) > -1e-3 and float(u.max()) <= 1 + 1e-6
    assert torch.all(u[:, 1:, 0] == 1)  # the inflow value
    assert float(u[:, -1, :8].mean()) > float(u[:, 0, :8].mean()) + 0.3  # the front has come in


def test_grid_rejects_a_diffusion_its_outflow_row_cannot_take() -> None:
    with pytest.raises(ValueError, match="diffusion_sorption needs D < dx/4"):
        PDEGrid(nx=65, nt=4, t_end=1.0, nu=0.004, rho=0.0, equation="diffusion_sorption")


def _rows_by_loops(b1: torch.Tensor, w: torch.Tensor, j_idx, i_idx, d: float, dt: float, dx: float) -> list[float]:
    u = lambda j, i: float(b1[j, i] @ w)  # noqa: E731
    out = []
    for j, i in zip(j_idx.tolist(), i_idx.tolist()):
        lap = (u(j, i - 1) - 2 * u(j, i) + u(j, i + 1)) + (u(j - 1, i - 1) - 2 * u(j - 1, i) + u(j - 1, i + 1))
        out.append(_retardation((u(j, i) + u(j - 1, i)) / 2) * (u(j, i) - u(j - 1, i)) - d * dt / (2 * dx**2) * lap)
    return out


def test_rows_match_the_formula_and_the_loss() -> None:
    grid = PDEGrid(nx=11, nt=7, t_end=50.0, nu=5e-4, rho=0.0, equation="diffusion_sorption")
    g = torch.Generator().manual_seed(3)
    b = 0.3 + 0.2 * torch.randn(2, grid.nt, grid.nx, 5, generator=g, dtype=F64)
    omega = torch.rand(2, 5, generator=g, dtype=F64) * 0.4
    j, i = (t.flatten() for t in torch.meshgrid(torch.arange(1, grid.nt), torch.arange(1, grid.nx - 1), indexing="ij"))
    pde = DiffusionSorption(nu=grid.nu, dt=grid.dt, dx=grid.dx)
    rows, jac = pde.residual_and_jacobian(pde.gather(b, j, i), omega)
    for s in range(2):
        want = torch.tensor(_rows_by_loops(b[s], omega[s], j, i, grid.nu, grid.dt, grid.dx), dtype=F64)
        torch.testing.assert_close(rows[s], want, rtol=1e-12, atol=1e-13)
        auto = torch.autograd.functional.jacobian(
            lambda v: pde.residual_and_jacobian(pde.gather(b[s:s + 1], j, i), v[None])[0][0], omega[s])
        torch.testing.assert_close(jac[s], auto, rtol=1e-11, atol=1e-12)
    u = torch.einsum("btxn,bn->btx", b, omega)  # the training loss codes the same residual on the grid
    torch.testing.assert_close(grid_residual(u, grid).flatten(1), rows, rtol=1e-12, atol=1e-12)
    # and the same boundary rows: u = 1 in, (1 - D/dx) u_N + (D/dx) u_{N-1} = 0 out
    k = grid.nu / grid.dx
    want_bc = torch.cat([u[:, 1:, 0] - 1, (1 - k) * u[:, 1:, -1] + k * u[:, 1:, -2]], 1)
    torch.testing.assert_close(boundary_residual(u, grid), want_bc)


def _problem(seed: int):
    """A 4 x 6 block holding both edges: PDE rows inside, the inflow row at i = 0, the outflow row at i = 5."""
    tb, xb, n, d, dt, dx = 4, 6, 4, 0.02, 0.1, 0.1
    jj, ii = torch.meshgrid(torch.arange(1, tb), torch.arange(1, xb - 1), indexing="ij")
    bc_j = torch.arange(1, tb).repeat(2)
    bc_i = torch.tensor([0, xb - 1]).repeat_interleave(tb - 1)
    right = bc_i == xb - 1
    pts = ConstraintPoints(jj.flatten(), ii.flatten(), torch.zeros(xb, dtype=torch.long), torch.arange(xb), bc_j, bc_i,
                           bc_inner=torch.where(right, xb - 2, 1), bc_kappa=torch.where(right, d / dx, 0.0).double(),
                           bc_value=torch.where(right, 0.0, 1.0).double())
    g = torch.Generator().manual_seed(seed)
    b = 0.3 + 0.1 * torch.randn(2, tb, xb, n, generator=g, dtype=F64)
    u0 = 0.3 + 0.2 * torch.rand(2, xb, generator=g, dtype=F64)
    return b, u0, pts, DiffusionSorption(nu=d, dt=dt, dx=dx), (d, dt, dx)


def _objective(w, b1, u01, pts, coef, ridge):
    """L(ω) for one sample from the formulas above, independent of the module."""
    d, dt, dx = coef
    u = b1 @ w
    j, i = pts.pde_j, pts.pde_i
    lap = (u[j, i - 1] - 2 * u[j, i] + u[j, i + 1]) + (u[j - 1, i - 1] - 2 * u[j - 1, i] + u[j - 1, i + 1])
    mean = _soft_floor((u[j, i] + u[j - 1, i]) / 2)
    res = (1 + A * mean ** (N_F - 1)) * (u[j, i] - u[j - 1, i]) - d * dt / (2 * dx**2) * lap
    k = pts.bc_kappa
    bc = (1 - k) * u[pts.bc_j, pts.bc_i] + k * u[pts.bc_j, pts.bc_inner] - pts.bc_value
    r = torch.cat([res, u[pts.ic_j, pts.ic_i] - u01, bc])
    return 0.5 * (r * r).sum() + 0.5 * ridge * (w * w).sum()


def test_solution_is_stationary_and_hessian_is_the_objectives() -> None:
    b, u0, pts, pde, coef = _problem(0)
    opt = LMOptions(tol=1e-14)
    omega, info = solve_hard_constraint(b, u0, pts, pde, opt)
    assert info.unconverged == 0
    h = full_hessian(b, u0, pts, pde, omega, opt.ridge)
    for s in range(2):
        w = omega[s].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_objective(w, b[s], u0[s], pts, coef, opt.ridge), w)
        assert float(grad.abs().max()) < 1e-10
        auto = torch.autograd.functional.hessian(lambda v: _objective(v, b[s], u0[s], pts, coef, opt.ridge), omega[s])
        torch.testing.assert_close(h[s], auto, rtol=1e-10, atol=1e-12)


def test_ift_gradient_matches_central_finite_differences() -> None:
    b, u0, pts, pde, _ = _problem(1)
    grad, fd = ift_and_finite_differences(b, u0, pts, pde, LMOptions(tol=1e-14), h=1e-6)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8 * float(fd.abs().max()))


def test_experts_get_the_inflow_and_outflow_rows_of_their_sides() -> None:
    grid = PDEGrid(nx=17, nt=5, t_end=50.0, nu=5e-4, rho=0.0, equation="diffusion_sorption")
    left, right = boundary_rows(grid)
    subs = decompose(grid, 4)
    first, middle, last = (constraint_points(subs[k], grid, 8) for k in (0, 1, 3))
    assert middle.bc_j.numel() == 0
    assert torch.all(first.bc_value == left.value) and torch.all(first.bc_kappa == 0)
    assert torch.all(first.bc_inner == first.bc_i + 1)
    assert torch.all(last.bc_value == 0) and torch.all(last.bc_kappa == right.kappa)
    assert torch.all(last.bc_inner == last.bc_i - 1)


@pytest.mark.slow
def test_front_band_converges_with_exact_hessian_steps_where_gauss_newton_does_not() -> None:
    """The hard case of configs/moe_sorption.yaml: the first of 4 time bands (the front entering,
    R(u) steep near u = 0) with the untrained basis network of seed 0. Levenberg–Marquardt on the exact
    Hessian (the default) brings every sample to the gradient test, each solution stationary by
    autograd of the objective written above; Gauss–Newton steps leave samples short of it in 50."""
    from pathlib import Path

    from dist_train.config.load import load_config
    from dist_train.data import build_dataset
    from dist_train.pde.task import PDESolving

    config = Path(__file__).resolve().parents[1] / "configs" / "moe_sorption.yaml"
    cfg = load_config(config, ["moe.points=1024", "moe.experts=4", "moe.time_splits=4", "data.num_examples=64"])
    data = build_dataset(cfg.data, 0)
    u0_all = data._splits["train"][0][:8]
    torch.manual_seed(0)
    model = PDESolving().build_model(cfg.model, data.info, cfg.moe)
    with torch.no_grad():
        b = model.basis(u0_all).double()
    sub, pts = model.experts.subs[0], model.experts.points[0]
    block, u0 = b[:, sub.ht0:sub.t1, sub.hx0:sub.hx1], u0_all[:, sub.ic_columns()].double()
    exact, info = solve_hard_constraint(block, u0, pts, model.experts.pde, LMOptions())
    _, info_gn = solve_hard_constraint(block, u0, pts, model.experts.pde, LMOptions(hessian="gauss_newton"))
    assert info.unconverged == 0 and info.stalled == 0 and info.iterations < 50, info
    assert info_gn.unconverged + info_gn.stalled > 0, info_gn
    grid = data.info.grid
    coef = (grid.nu, grid.dt, grid.dx)
    for s in range(2):
        w = exact[s].clone().requires_grad_(True)
        zero = torch.zeros_like(w, requires_grad=True)
        (grad,) = torch.autograd.grad(_objective(w, block[s], u0[s], pts, coef, 1e-4), w)
        (grad0,) = torch.autograd.grad(_objective(zero, block[s], u0[s], pts, coef, 1e-4), zero)
        assert float(grad.abs().max()) <= 1e-10 * max(1.0, float(grad0.abs().max())) * 1.01

"""The PI-HC hard-constraint layer (dist_train.pde.constraint): Levenberg–Marquardt forward, implicit-
function-theorem backward. Small float64 problems; the references (CN residual, finite differences, an
unrolled Newton loop) are written here independently of the module."""

from __future__ import annotations

import pytest
import torch

from dist_train.pde.constraint import ConstraintPoints, FisherKPP, LMOptions, solve_hard_constraint
from moe_cases import ift_and_finite_differences

F64 = torch.float64
NU, RHO, DT, DX = 0.02, 1.0, 0.1, 0.1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: intra-op threads only add overhead (3x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _points(tb: int, xb: int, halo_left: bool = True, halo_right: bool = True) -> ConstraintPoints:
    """PDE rows at every interior point (so columns 0 and Xb-1 act as halo in the stencil), IC on row 0,
    Dirichlet rows on the physical boundary columns only (a block with a halo has none there)."""
    jj, ii = torch.meshgrid(torch.arange(1, tb), torch.arange(1, xb - 1), indexing="ij")
    bc_cols = [c for c, halo in ((0, halo_left), (xb - 1, halo_right)) if not halo]
    bc_j = torch.arange(1, tb).repeat(len(bc_cols))
    bc_i = torch.tensor(bc_cols, dtype=torch.long).repeat_interleave(tb - 1)
    return ConstraintPoints(jj.flatten(), ii.flatten(), torch.zeros(xb, dtype=torch.long), torch.arange(xb), bc_j, bc_i)


def _problem(seed: int, bsz: int = 2, tb: int = 4, xb: int = 5, n: int = 4, scale: float = 0.4, **kw):
    g = torch.Generator().manual_seed(seed)
    b = scale * torch.randn(bsz, tb, xb, n, generator=g, dtype=F64)
    pts = _points(tb, xb, **kw)
    u0 = 0.5 + 0.4 * torch.rand(bsz, pts.ic_j.numel(), generator=g, dtype=F64)
    return b, u0, pts


def _cn_rows_loops(b1: torch.Tensor, w: torch.Tensor, pts: ConstraintPoints, nu=NU, rho=RHO, dt=DT, dx=DX) -> list[float]:
    """dt · Crank–Nicolson residual, one point at a time (one sample: b1 [Tb, Xb, N])."""
    u = lambda j, i: float(b1[j, i] @ w)  # noqa: E731
    out = []
    for j, i in zip(pts.pde_j.tolist(), pts.pde_i.tolist()):
        lap_new = u(j, i - 1) - 2 * u(j, i) + u(j, i + 1)
        lap_old = u(j - 1, i - 1) - 2 * u(j - 1, i) + u(j - 1, i + 1)
        react = u(j, i) * (1 - u(j, i)) + u(j - 1, i) * (1 - u(j - 1, i))
        out.append(dt * ((u(j, i) - u(j - 1, i)) / dt - nu / (2 * dx**2) * (lap_new + lap_old) - rho / 2 * react))
    return out


def _objective(w, b1, u01, pts, ridge, nu=NU, rho=RHO, dt=DT, dx=DX):
    """L(ω) for one sample, vectorised over a full grid u = b·ω (independent of the module)."""
    u = b1 @ w
    j, i = pts.pde_j, pts.pde_i
    lap = (u[j, i - 1] - 2 * u[j, i] + u[j, i + 1]) + (u[j - 1, i - 1] - 2 * u[j - 1, i] + u[j - 1, i + 1])
    res = (u[j, i] - u[j - 1, i]) / dt - nu / (2 * dx**2) * lap - rho / 2 * (u[j, i] * (1 - u[j, i]) + u[j - 1, i] * (1 - u[j - 1, i]))
    r = torch.cat([dt * res, u[pts.ic_j, pts.ic_i] - u01, u[pts.bc_j, pts.bc_i]])
    return 0.5 * (r * r).sum() + 0.5 * ridge * (w * w).sum()


def test_residual_rows_match_cn_formula_with_loops():
    b, _, pts = _problem(1, bsz=2, tb=5, xb=6, n=3, scale=1.0)
    w = torch.randn(2, 3, dtype=F64)
    pde = FisherKPP(NU, RHO, DT, DX)
    r, jac = pde.residual_and_jacobian(pde.gather(b, pts.pde_j, pts.pde_i), w)
    for s in range(2):
        assert torch.allclose(r[s], torch.tensor(_cn_rows_loops(b[s], w[s], pts), dtype=F64), rtol=1e-12, atol=1e-13)
        # the analytic Jacobian is the derivative of these rows
        auto = torch.autograd.functional.jacobian(lambda v: pde.residual_and_jacobian(pde.gather(b[s:s + 1], pts.pde_j, pts.pde_i), v[None])[0][0], w[s])
        assert torch.allclose(jac[s], auto, rtol=1e-12, atol=1e-13)


def test_ift_gradient_matches_central_finite_differences():
    b, u0, pts = _problem(2, bsz=2, tb=4, xb=5, n=3, scale=0.5)  # halo on both sides, no BC rows
    grad, fd = ift_and_finite_differences(b, u0, pts, FisherKPP(NU, RHO, DT, DX), LMOptions(tol=1e-14), h=1e-5)
    assert torch.allclose(grad, fd, rtol=1e-5, atol=1e-8 * fd.abs().max())


def test_ift_gradient_matches_unrolled_newton():
    b, u0, pts = _problem(4, bsz=2, tb=4, xb=6, n=4, scale=0.5, halo_left=False)  # BC column + right halo
    pde, opt = FisherKPP(NU, RHO, DT, DX), LMOptions(tol=1e-14)
    wts = torch.randn(b.shape[:3], generator=torch.Generator().manual_seed(5), dtype=F64)
    bg = b.clone().requires_grad_(True)
    omega, _ = solve_hard_constraint(bg, u0, pts, pde, opt)
    (g_ift,) = torch.autograd.grad((wts * torch.einsum("btxn,bn->btx", bg, omega)).sum(), bg)
    # Reference: full Newton on L, every iteration kept in the autograd graph, then differentiated.
    bu = b.clone().requires_grad_(True)
    total = 0.0
    for s in range(b.shape[0]):
        w = torch.zeros(b.shape[-1], dtype=F64, requires_grad=True)
        for _ in range(25):
            (g,) = torch.autograd.grad(_objective(w, bu[s], u0[s], pts, opt.ridge), w, create_graph=True)
            hess = torch.stack([torch.autograd.grad(g[k], w, create_graph=True)[0] for k in range(g.numel())])
            w = w - torch.linalg.solve(hess, g)
        (g_end,) = torch.autograd.grad(_objective(w, bu[s], u0[s], pts, opt.ridge), w, retain_graph=True)
        assert g_end.abs().max() < 1e-13  # the unrolled loop did converge
        assert torch.allclose(w, omega[s].detach(), rtol=1e-10, atol=1e-12)
        total = total + (wts[s] * (bu[s] @ w)).sum()
    (g_unrolled,) = torch.autograd.grad(total, bu)
    assert torch.allclose(g_ift, g_unrolled, rtol=1e-5, atol=1e-10)


def test_converged_gradient_below_tolerance_and_float32_input():
    b, u0, pts = _problem(6, bsz=3, tb=5, xb=6, n=5, scale=0.6, halo_left=False, halo_right=False)
    pde, opt = FisherKPP(NU, RHO, DT, DX), LMOptions()
    omega, info = solve_hard_constraint(b, u0, pts, pde, opt)
    assert omega.dtype == F64 and info.unconverged == 0 and info.fallbacks == 0
    thresholds = []
    for s in range(3):  # the documented criterion: ‖∇L(ω*)‖∞ <= tol · max(1, ‖∇L(0)‖∞), ∇L by autograd here
        w, z = omega[s].clone().requires_grad_(True), torch.zeros_like(omega[s], requires_grad=True)
        (g,) = torch.autograd.grad(_objective(w, b[s], u0[s], pts, opt.ridge), w)
        (g0,) = torch.autograd.grad(_objective(z, b[s], u0[s], pts, opt.ridge), z)
        thresholds.append(opt.tol * max(1.0, float(g0.abs().max())))
        assert float(g.abs().max()) <= thresholds[-1]
    assert info.grad_norm <= max(thresholds) and 1 <= info.mean_iterations <= info.iterations <= opt.max_iter
    b32 = b.float().requires_grad_(True)
    omega32, _ = solve_hard_constraint(b32, u0, pts, pde, opt)
    omega32.sum().backward()
    assert omega32.dtype == F64 and b32.grad.dtype == torch.float32 and torch.isfinite(b32.grad).all()


def test_consistent_problem_recovers_omega_true():
    """rho = 0: march the CN scheme exactly, then build a basis whose ω_true-combination is that solution."""
    tb, xb, n, nu, dt, dx = 6, 7, 4, 0.05, 0.1, 0.1
    g = torch.Generator().manual_seed(7)
    a = nu * dt / (2 * dx**2)
    m = xb - 2
    lap = -2 * torch.eye(m, dtype=F64) + torch.diag(torch.ones(m - 1, dtype=F64), 1) + torch.diag(torch.ones(m - 1, dtype=F64), -1)
    u = torch.zeros(tb, xb, dtype=F64)
    u[0, 1:-1] = torch.sin(torch.pi * torch.arange(1, xb - 1, dtype=F64) / (xb - 1))
    for j in range(1, tb):  # (I − a Δ) u^j = (I + a Δ) u^{j−1}, zero Dirichlet
        u[j, 1:-1] = torch.linalg.solve(torch.eye(m, dtype=F64) - a * lap, (torch.eye(m, dtype=F64) + a * lap) @ u[j - 1, 1:-1])
    w_true = torch.tensor([0.7, -1.3, 0.4, 2.0], dtype=F64)
    b = torch.randn(1, tb, xb, n, generator=g, dtype=F64)
    b[0, ..., 0] = (u - b[0, ..., 1:] @ w_true[1:]) / w_true[0]
    pts = _points(tb, xb, halo_left=False, halo_right=False)
    u0 = u[pts.ic_j, pts.ic_i][None]
    pde = FisherKPP(nu, 0.0, dt, dx)
    omega, info = solve_hard_constraint(b, u0, pts, pde, LMOptions(ridge=1e-14))
    assert info.unconverged == 0
    assert torch.allclose(omega[0], w_true, rtol=0, atol=1e-9)
    r, _ = pde.residual_and_jacobian(pde.gather(b, pts.pde_j, pts.pde_i), omega)
    rows = torch.cat([r[0], b[0, pts.ic_j, pts.ic_i] @ omega[0] - u0[0], b[0, pts.bc_j, pts.bc_i] @ omega[0]])
    assert rows.abs().max() < 1e-8


def test_batched_solve_equals_one_at_a_time():
    b, u0, pts = _problem(8, bsz=4, tb=5, xb=6, n=4, scale=0.7, halo_right=False)
    u0[2] *= 10.0  # a more nonlinear sample: 3 to 6 LM iterations across this batch
    pde, opt = FisherKPP(NU, RHO, DT, DX), LMOptions()
    together, _ = solve_hard_constraint(b, u0, pts, pde, opt)
    alone = torch.cat([solve_hard_constraint(b[s:s + 1], u0[s:s + 1], pts, pde, opt)[0] for s in range(4)])
    assert torch.allclose(together, alone, rtol=0, atol=1e-12)
    wts = torch.randn(4, 4, dtype=F64)
    bg = b.clone().requires_grad_(True)
    (g_together,) = torch.autograd.grad((wts * solve_hard_constraint(bg, u0, pts, pde, opt)[0]).sum(), bg)
    for s in range(4):
        bs = b[s:s + 1].clone().requires_grad_(True)
        (g_s,) = torch.autograd.grad((wts[s:s + 1] * solve_hard_constraint(bs, u0[s:s + 1], pts, pde, opt)[0]).sum(), bs)
        assert torch.allclose(g_together[s:s + 1], g_s, rtol=0, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    b, u0, pts = _problem(9)
    pde = FisherKPP(NU, RHO, DT, DX)
    bad = b.clone()
    bad[1, 2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite basis values"):
        solve_hard_constraint(bad, u0, pts, pde)
    xb = b.shape[2]
    for j, i in ((2, xb - 1), (0, 2), (2, 0)):
        outside = ConstraintPoints(torch.tensor([1, j]), torch.tensor([1, i]), pts.ic_j, pts.ic_i, pts.bc_j, pts.bc_i)
        with pytest.raises(ValueError, match=rf"pde point #1 \(j={j}, i={i}\)"):
            solve_hard_constraint(b, u0, outside, pde)
    with pytest.raises(ValueError, match="u0_targets"):
        solve_hard_constraint(b, u0[:, :2], pts, pde)


def test_singular_system_falls_back_without_nan():
    """All-zero basis, ridge 0: the normal matrix is 0. The forward raises damping (fallbacks) and returns
    the finite ω = 0; the backward has no implicit gradient and says so instead of returning NaN."""
    b, u0, pts = _problem(10)
    b = torch.zeros_like(b, requires_grad=True)
    omega, info = solve_hard_constraint(b, u0, pts, FisherKPP(NU, RHO, DT, DX), LMOptions(ridge=0.0))
    assert torch.isfinite(omega).all() and (omega == 0).all()
    assert info.fallbacks >= b.shape[0] and info.unconverged == 0
    with pytest.raises(ValueError, match="Hessian singular"):
        omega.sum().backward()


def test_a_sample_that_cannot_meet_the_gradient_test_stops_when_it_stalls():
    """tol = 1e-30 is below float64 rounding of ∇L: without the cost test (ftol = 0) every sample runs to
    max_iter on rejected steps; with it each stops once a rejected step was promised ≤ ftol·L, at the
    same ω (to rounding) and long before the cap."""
    b, u0, pts = _problem(11, bsz=3, tb=5, xb=6, n=5, scale=0.6, halo_left=False, halo_right=False)
    pde = FisherKPP(NU, RHO, DT, DX)
    endless, info_endless = solve_hard_constraint(b, u0, pts, pde, LMOptions(tol=1e-30, ftol=0.0, max_iter=40))
    assert info_endless.unconverged == 3 and info_endless.stalled == 0 and info_endless.iterations == 40
    stopped, info = solve_hard_constraint(b, u0, pts, pde, LMOptions(tol=1e-30, max_iter=40))
    assert info.stalled == 3 and info.unconverged == 0 and info.iterations < 20
    assert torch.allclose(stopped, endless, rtol=1e-10, atol=1e-13)


def test_exact_hessian_steps_reach_the_same_optimum_in_fewer_iterations():
    """A large-residual problem (u0 × 10, rho = 5: L ~ 1e2 at the optimum), where Gauss–Newton converges
    only linearly. The exact model (default) is the objective's Hessian, checked against autograd
    here, and reaches the same ω* quadratically."""
    from dist_train.pde.constraint import _model_matrices, _rows

    b, u0, pts = _problem(12, bsz=3, tb=6, xb=7, n=5, scale=0.6, halo_left=False, halo_right=False)
    u0, rho = 10.0 * u0, 5.0
    pde = FisherKPP(NU, rho, DT, DX)
    exact, info_exact = solve_hard_constraint(b, u0, pts, pde, LMOptions(hessian="exact", max_iter=200))
    gn, info_gn = solve_hard_constraint(b, u0, pts, pde, LMOptions(hessian="gauss_newton", max_iter=200))
    assert info_exact.unconverged == info_gn.unconverged == 0 and info_exact.stalled == info_gn.stalled == 0
    assert torch.allclose(exact, gn, rtol=1e-8, atol=1e-9)
    assert info_exact.iterations <= 5 and info_gn.iterations >= 10, (info_exact.iterations, info_gn.iterations)
    w = exact + 0.1  # away from the optimum, where the residual-weighted term matters
    r, jac, st, r_pde = _rows(b, u0, pts, pde, w)
    _, model = _model_matrices(jac, st, r_pde, w, pde, LMOptions())
    for s in range(3):
        auto = torch.autograd.functional.hessian(lambda v: _objective(v, b[s], u0[s], pts, 1e-4, rho=rho), w[s])
        assert torch.allclose(model[s], auto, rtol=1e-10, atol=1e-10 * auto.abs().max())
    with pytest.raises(ValueError, match="hessian must be"):
        LMOptions(hessian="newton")

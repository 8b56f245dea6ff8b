"""fisher_kpp: the 1D reaction–diffusion (Fisher–KPP) family of the PDE workload (no download).

The problem, on x in [0, 1], t in [0, t_end], with Dirichlet values u(0, t) = u(1, t) = 0:

    u_t = nu * u_xx + rho * u (1 - u)

A model maps the initial condition u0 sampled on `nx` points to the whole solution on the
(nt, nx) space-time grid (the setting of neural-operator benchmarks such as PDEBench). Why
Fisher–KPP: it is nonlinear, like PDEBench's diffusion–sorption (a model cannot learn it as a
linear operator), but its reaction part has an exact solution (the logistic ODE), so the solver's
operator split is exact when nu = 0, and rho = 0 leaves the heat equation with its sine-series
solution: both limits give the tests a closed form to check the reference solver against. For u0 in
[0, 1] the solution stays in [0, 1] (comparison principle), so targets are bounded.

Initial conditions are a seeded parametric family (`initial_conditions`), also the base of
diffusion–sorption's (`sorption.py`); targets come from a finite-difference reference solver
(`solve_reference`); the boundary rows are u = 0 at both ends (`boundary_rows`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from dist_train.pde.family import BoundaryRow

if TYPE_CHECKING:
    from dist_train.pde.grid import PDEGrid


def initial_conditions(n: int, nx: int, generator: torch.Generator) -> torch.Tensor:
    """[n, nx] float64: u0(x) = sin(pi x) * sum_{j<=J} a_j exp(-(x - c_j)^2 / (2 w_j^2)).

    Per example J is uniform in 1..3, a_j in [0.3, 0.9], c_j in [0.15, 0.85], w_j in [0.04, 0.15];
    an example whose maximum exceeds 0.95 is scaled down to 0.95, so u0 lies in [0, 0.95] and the
    solution in [0, 1]. The sin(pi x) factor makes u0 vanish at the boundaries (set to exactly 0
    there: sin(pi) is 1.2e-16 in floating point). A pure function of the generator's state."""
    n_bumps = torch.randint(1, 4, (n, 1), generator=generator)
    # Parameters for all 3 bumps are drawn for every example, so the stream does not depend on J.
    amp, centre, width = (lo + (hi - lo) * torch.rand(n, 3, generator=generator, dtype=torch.float64)
                          for lo, hi in ((0.3, 0.9), (0.15, 0.85), (0.04, 0.15)))
    amp = amp * (torch.arange(3) < n_bumps)  # bumps beyond J contribute nothing
    x = torch.linspace(0.0, 1.0, nx, dtype=torch.float64)
    bumps = amp[:, :, None] * torch.exp(-(x - centre[:, :, None]) ** 2 / (2 * width[:, :, None] ** 2))
    u0 = torch.sin(math.pi * x) * bumps.sum(dim=1)
    peak = u0.amax(dim=1, keepdim=True)
    u0 = (u0 * torch.clamp(0.95 / peak, max=1.0)).clamp(0.0, 0.95)  # clamp: rounding of the scale
    u0[:, 0] = 0.0
    u0[:, -1] = 0.0
    return u0


def _react(u: torch.Tensor, growth: float) -> torch.Tensor:
    """Exact flow of u' = rho u (1 - u) over a time s, growth = e^{rho s}: u g / (1 - u + u g)."""
    denom = u * (growth - 1.0)
    denom += 1.0
    u = u * growth
    u /= denom  # in place: this runs once per substep on the whole batch
    return u


def _diffusion_propagator(n_interior: int, r: float) -> torch.Tensor:
    """Crank–Nicolson step on the interior points as one matrix P = (I - r/2 D)^{-1} (I + r/2 D).

    D is the tridiagonal [1, -2, 1] second difference and r = nu tau / h^2; the zero Dirichlet
    values drop out of D. I - r/2 D is factored once and P formed once, so each substep is a single
    batched matrix product (a GEMM is faster here than two triangular solves per substep)."""
    second_diff = (torch.diag(torch.full((n_interior,), -2.0, dtype=torch.float64))
                   + torch.diag(torch.ones(n_interior - 1, dtype=torch.float64), 1)
                   + torch.diag(torch.ones(n_interior - 1, dtype=torch.float64), -1))
    eye = torch.eye(n_interior, dtype=torch.float64)
    lu, pivots = torch.linalg.lu_factor(eye - 0.5 * r * second_diff)
    return torch.linalg.lu_solve(lu, pivots, eye + 0.5 * r * second_diff)


def solve_reference(u0: torch.Tensor, grid: PDEGrid, refine_x: int = 2, substeps: int = 8) -> torch.Tensor:
    """[B, nt, nx] float64 solution of Fisher–KPP from u0 [B, nx] (float64, zero at both ends).

    Scheme: u0 is interpolated linearly onto a grid `refine_x` times finer in x; each of the
    nt - 1 output steps dt is `substeps` Strang-split substeps of tau = dt / substeps: half a
    reaction step by the logistic ODE's exact solution, one Crank–Nicolson diffusion step with the
    second-order central Laplacian and zero Dirichlet values, the other half reaction step. Both
    parts are second order and Strang splitting keeps the composition second order: the solver
    is 2nd order in space and time. The output is the fine solution at the nt time levels, taken
    at the nx original points. With nu = 0 it is exact (up to rounding); with rho = 0 it is CN.
    Positivity (and u <= 1) is guaranteed when r = nu tau / h_fine^2 <= 1 (then CN's matrices
    are nonnegative and the logistic step maps [0, 1] to itself).

    Defaults, measured at the data set's settings (nx=128, nt=64, t_end=1, nu=0.005, rho=1) on
    32 examples of the default family by a one-off script (too slow for the tests): relative L2
    error over the (nt, nx) grid at most 3.4e-4 (mean 1.0e-4) against refine_x=8, substeps=32,
    i.e. against the PDE started from the piecewise-linear u0 this solver sees; at most 5.8e-4
    (mean 1.9e-4) against the PDE started from the smooth family itself (the formula sampled on an
    8x finer grid, refine_x=1, substeps=32). The error is almost all spatial: substeps 1..16 change
    it by under 40%. substeps=8 is chosen for positivity: r = 0.64 there (r = 1.28 at 4).
    refine_x=1 would give 1.4e-3 / 6.5e-4. Building a 512-example data set takes ~0.9 s of one core.
    """
    if grid.equation != "fisher_kpp":
        raise ValueError(f"solve_reference solves Fisher-KPP, not {grid.equation} (use reference_solution)")
    if u0.dim() != 2 or u0.shape[1] != grid.nx:
        raise ValueError(f"u0 must be [B, {grid.nx}], got {list(u0.shape)}")
    if refine_x < 1 or substeps < 1:
        raise ValueError(f"refine_x and substeps must be >= 1, got {refine_x}, {substeps}")
    u0 = u0.to(torch.float64)
    nx_f = (grid.nx - 1) * refine_x + 1
    # Linear interpolation onto the fine grid: every refine_x-th fine point is an original point.
    frac = torch.arange(refine_x, dtype=torch.float64) / refine_x
    u = (u0[:, :-1, None] * (1 - frac) + u0[:, 1:, None] * frac).reshape(u0.shape[0], -1)
    u = torch.cat([u, u0[:, -1:]], dim=1)[:, 1:-1]  # interior points only; the ends stay 0

    tau = grid.dt / substeps
    h = 1.0 / (nx_f - 1)
    prop_t = _diffusion_propagator(nx_f - 2, grid.nu * tau / h**2).T.contiguous()  # rows: u @ P^T
    half_growth, full_growth = math.exp(grid.rho * tau / 2), math.exp(grid.rho * tau)

    out = torch.zeros(u0.shape[0], grid.nt, grid.nx, dtype=torch.float64)
    out[:, 0] = u0
    for level in range(1, grid.nt):
        # Strang substeps R(tau/2) C R(tau/2), with the two half reaction steps between adjacent
        # substeps merged into one full step: the logistic flow is a group, so this is the same
        # scheme exactly, with half the reaction work.
        u = _react(u, half_growth)
        for k in range(substeps):
            u = u @ prop_t
            u = _react(u, full_growth if k < substeps - 1 else half_growth)
        out[:, level, 1:-1] = u[:, refine_x - 1::refine_x]
    return out


def boundary_rows(grid: PDEGrid) -> tuple[BoundaryRow, BoundaryRow]:
    """u = 0 at both ends, at every time level."""
    return BoundaryRow(0.0, 0.0), BoundaryRow(0.0, 0.0)

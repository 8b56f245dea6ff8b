"""The discretised PDE on a whole solution grid: the training loss of every PDE model (soft and hard
constraint alike) and the held-out metrics.

Both equations are discretised with Crank–Nicolson in time and the central second difference in
space, the same scheme the hard constraint enforces at its sampled points (`constraint.FisherKPP`,
`constraint.DiffusionSorption`; tests check that the two agree point by point). At a grid point
(j, i), j ≥ 1, 1 ≤ i ≤ nx − 2, with δ²u[j,i] = u[j,i−1] − 2u[j,i] + u[j,i+1]:

  Fisher–KPP, u_t = ν u_xx + ρ u(1 − u):
    R = (u[j,i] − u[j−1,i])/Δt − ν/(2Δx²) [δ²u[j,i] + δ²u[j−1,i]] − ρ/2 [f(u[j,i]) + f(u[j−1,i])],  f(u) = u(1 − u)
  diffusion–sorption, R(u) u_t = D u_xx (`sorption.py`):
    R = R(ū)(u[j,i] − u[j−1,i])/Δt − D/(2Δx²) [δ²u[j,i] + δ²u[j−1,i]],  ū = (u[j,i] + u[j−1,i])/2

Rows are scaled by Δt, as in the constraint, so residual, initial and boundary terms weigh alike. The
boundary term is each side's `family.BoundaryRow` at every time level j ≥ 1.
"""

from __future__ import annotations

from typing import Callable

import torch

from dist_train.pde.grid import PDEGrid, boundary_rows
from dist_train.pde.sorption import retardation


def _laplacian_sum(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    def lap(v: torch.Tensor) -> torch.Tensor:
        return v[:, :, :-2] - 2 * v[:, :, 1:-1] + v[:, :, 2:]

    return lap(now) + lap(before)


def _fisher_kpp(now: torch.Tensor, before: torch.Tensor, grid: PDEGrid) -> torch.Tensor:
    def react(v: torch.Tensor) -> torch.Tensor:
        return v * (1 - v)

    centre_now, centre_before = now[:, :, 1:-1], before[:, :, 1:-1]
    r = ((centre_now - centre_before) / grid.dt - grid.nu / (2 * grid.dx ** 2) * _laplacian_sum(now, before)
         - grid.rho / 2 * (react(centre_now) + react(centre_before)))
    return r * grid.dt


def _diffusion_sorption(now: torch.Tensor, before: torch.Tensor, grid: PDEGrid) -> torch.Tensor:
    centre_now, centre_before = now[:, :, 1:-1], before[:, :, 1:-1]
    storage = retardation((centre_now + centre_before) / 2) * (centre_now - centre_before)
    return storage - grid.nu * grid.dt / (2 * grid.dx ** 2) * _laplacian_sum(now, before)


# `PDEGrid.equation` -> Δt·R on the interior from (u at levels 1.., u at levels ..nt-2)
RESIDUALS: dict[str, Callable[[torch.Tensor, torch.Tensor, PDEGrid], torch.Tensor]] = {
    "fisher_kpp": _fisher_kpp,
    "diffusion_sorption": _diffusion_sorption,
}


def grid_residual(u: torch.Tensor, grid: PDEGrid) -> torch.Tensor:
    """Δt·R at every interior point: [B, nt − 1, nx − 2] for u of shape [B, nt, nx]."""
    return RESIDUALS[grid.equation](u[:, 1:], u[:, :-1], grid)


def boundary_residual(u: torch.Tensor, grid: PDEGrid) -> torch.Tensor:
    """[B, 2 (nt − 1)]: both sides' boundary rows at every level j ≥ 1 (left side first)."""
    left, right = boundary_rows(grid)
    rows_left = (1 - left.kappa) * u[:, 1:, 0] + left.kappa * u[:, 1:, 1] - left.value
    rows_right = (1 - right.kappa) * u[:, 1:, -1] + right.kappa * u[:, 1:, -2] - right.value
    return torch.cat([rows_left, rows_right], 1)


def physics_loss(u: torch.Tensor, u0: torch.Tensor, grid: PDEGrid) -> torch.Tensor:
    """Mean squared residual + mean squared initial-condition error + mean squared boundary row:
    the physics-informed loss (no solution data), as PI-HC trains its models."""
    residual = grid_residual(u, grid).pow(2).mean()
    initial = (u[:, 0] - u0).pow(2).mean()
    boundary = boundary_residual(u, grid).pow(2).mean()
    return residual + initial + boundary


def relative_l2(u: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖u − u_ref‖₂ / ‖u_ref‖₂ over the whole space-time grid, averaged over the batch."""
    diff = (u - reference).flatten(1).norm(dim=1)
    return (diff / reference.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()

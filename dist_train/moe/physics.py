"""The discretised PDE on a whole solution grid: the training loss of every PDE model (soft and hard
constraint alike) and the held-out metrics.

Fisher–KPP, u_t = ν u_xx + ρ u(1 − u) on x ∈ [0, 1] with u(0, t) = u(1, t) = 0, discretised with
Crank–Nicolson in time and the central second difference in space, the same scheme the hard
constraint enforces at its sampled points (`hard_constraint.FisherKPP`; a test checks that the two
agree point by point). At a grid point (j, i), j ≥ 1, 1 ≤ i ≤ nx − 2:

    R = (u[j,i] − u[j−1,i])/Δt − ν/(2Δx²) [δ²u[j,i] + δ²u[j−1,i]] − ρ/2 [f(u[j,i]) + f(u[j−1,i])],
    δ²u[j,i] = u[j,i−1] − 2u[j,i] + u[j,i+1],   f(u) = u(1 − u).

Rows are scaled by Δt, as in the constraint, so residual, initial and boundary terms weigh alike.
"""

from __future__ import annotations

import torch

from dist_train.data.pde import PDEGrid


def grid_residual(u: torch.Tensor, grid: PDEGrid) -> torch.Tensor:
    """Δt·R at every interior point: [B, nt − 1, nx − 2] for u of shape [B, nt, nx]."""
    now, before = u[:, 1:], u[:, :-1]

    def lap(v: torch.Tensor) -> torch.Tensor:
        return v[:, :, :-2] - 2 * v[:, :, 1:-1] + v[:, :, 2:]

    def react(v: torch.Tensor) -> torch.Tensor:
        return v * (1 - v)

    centre_now, centre_before = now[:, :, 1:-1], before[:, :, 1:-1]
    r = ((centre_now - centre_before) / grid.dt - grid.nu / (2 * grid.dx ** 2) * (lap(now) + lap(before))
         - grid.rho / 2 * (react(centre_now) + react(centre_before)))
    return r * grid.dt


def physics_loss(u: torch.Tensor, u0: torch.Tensor, grid: PDEGrid) -> torch.Tensor:
    """Mean squared residual + mean squared initial-condition error + mean squared boundary value:
    the physics-informed loss (no solution data), as PI-HC trains its models."""
    residual = grid_residual(u, grid).pow(2).mean()
    initial = (u[:, 0] - u0).pow(2).mean()
    boundary = torch.cat([u[:, 1:, 0], u[:, 1:, -1]], 1).pow(2).mean()
    return residual + initial + boundary


def relative_l2(u: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖u − u_ref‖₂ / ‖u_ref‖₂ over the whole space-time grid, averaged over the batch."""
    diff = (u - reference).flatten(1).norm(dim=1)
    return (diff / reference.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()

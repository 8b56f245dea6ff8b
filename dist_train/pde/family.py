"""What one PDE family provides the rest of the package: its initial conditions, its reference solver,
its boundary rows and the grid check; and the form every boundary condition takes (`BoundaryRow`).

Each family lives in its own module (`fisher_kpp`, `sorption`); `grid.FAMILIES` names them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from dist_train.pde.grid import PDEGrid


@dataclass(frozen=True)
class BoundaryRow:
    """The condition on one side at every time level j >= 1: (1 - kappa) u[j, edge] + kappa u[j, inner] = value,
    `inner` the edge's neighbouring column. kappa = 0: Dirichlet u = value; kappa > 0: a Robin condition
    in one-sided difference form."""

    value: float
    kappa: float


@dataclass(frozen=True)
class Family:
    """What the data side knows of one equation: its initial conditions, reference solver and boundary rows."""

    initial_conditions: Callable[[int, int, torch.Generator], torch.Tensor]
    solve_reference: Callable[[torch.Tensor, PDEGrid], torch.Tensor]
    boundary: Callable[[PDEGrid], tuple[BoundaryRow, BoundaryRow]]
    check: Callable[[PDEGrid], None] = lambda grid: None  # ValueError for coefficients the scheme cannot take

"""The space-time grid of the PDE workload and the table of equation families it names.

The grid names its equation (`PDEGrid.equation`): "fisher_kpp" (`fisher_kpp.py`) or
"diffusion_sorption" (`sorption.py`, PI-HC-MoE's own 1D problem). `FAMILIES` maps each to its initial
conditions, reference solver and boundary rows; the data sets, the physics loss and the experts read
only that table (through `boundary_rows`, `sample_initial_conditions` and `reference_solution`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_train.pde import fisher_kpp, sorption
from dist_train.pde.family import BoundaryRow, Family


@dataclass(frozen=True)
class PDEGrid:
    """The space-time grid, the equation and its coefficients. `nx` counts the boundary points, `nt` the
    t = 0 level. `nu` is the diffusion coefficient of either equation (D of diffusion–sorption); `rho`
    is Fisher–KPP's reaction rate (diffusion–sorption has none: 0)."""

    nx: int
    nt: int
    t_end: float
    nu: float
    rho: float
    equation: str = "fisher_kpp"

    def __post_init__(self) -> None:
        if self.nx < 3 or self.nt < 2:
            raise ValueError(f"PDEGrid needs nx >= 3 and nt >= 2, got nx={self.nx}, nt={self.nt}")
        if self.t_end <= 0 or self.nu < 0:
            raise ValueError(f"PDEGrid needs t_end > 0 and nu >= 0, got t_end={self.t_end}, nu={self.nu}")
        if self.equation not in FAMILIES:
            raise ValueError(f"PDEGrid: unknown equation {self.equation!r} (one of {', '.join(FAMILIES)})")
        FAMILIES[self.equation].check(self)

    @property
    def dx(self) -> float:
        return 1.0 / (self.nx - 1)

    @property
    def dt(self) -> float:
        return self.t_end / (self.nt - 1)

    @property
    def x(self) -> torch.Tensor:
        return torch.linspace(0.0, 1.0, self.nx, dtype=torch.float64)

    @property
    def t(self) -> torch.Tensor:
        return torch.linspace(0.0, self.t_end, self.nt, dtype=torch.float64)


def boundary_rows(grid: PDEGrid) -> tuple[BoundaryRow, BoundaryRow]:
    """(x = 0, x = 1) conditions of `grid`'s equation."""
    return FAMILIES[grid.equation].boundary(grid)


def sample_initial_conditions(grid: PDEGrid, n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, nx] float64 initial conditions of `grid`'s equation family."""
    return FAMILIES[grid.equation].initial_conditions(n, grid.nx, generator)


def reference_solution(u0: torch.Tensor, grid: PDEGrid) -> torch.Tensor:
    """[B, nt, nx] float64 reference solution of `grid`'s equation from u0 [B, nx]."""
    return FAMILIES[grid.equation].solve_reference(u0, grid)


# `PDEGrid.equation` -> its family; another PDE is another entry (and one in `physics.RESIDUALS` and
# `constraint.CONSTRAINT_ROWS`).
FAMILIES: dict[str, Family] = {
    "fisher_kpp": Family(fisher_kpp.initial_conditions, fisher_kpp.solve_reference, fisher_kpp.boundary_rows),
    "diffusion_sorption": Family(sorption.initial_conditions, sorption.solve_reference,
                                 sorption.boundary_rows, sorption.check_grid),
}

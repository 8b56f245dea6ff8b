"""pde: a 1D reaction–diffusion (Fisher–KPP) workload for neural PDE solvers (no download).

The problem, on x in [0, 1], t in [0, t_end], with Dirichlet values u(0, t) = u(1, t) = 0:

    u_t = nu * u_xx + rho * u (1 - u)

A model maps the initial condition u0 sampled on `nx` points to the whole solution on the
(nt, nx) space-time grid (the setting of neural-operator benchmarks such as PDEBench). Why
Fisher–KPP: it is nonlinear, like PDEBench's diffusion–sorption (a model cannot learn it as a
linear operator), but its reaction part has an exact solution (the logistic ODE), so the solver's
operator split is exact when nu = 0, and rho = 0 leaves the heat equation with its sine-series
solution: both limits give the tests a closed form to check the reference solver against. For u0 in
[0, 1] the solution stays in [0, 1] (comparison principle), so targets are bounded.

Initial conditions are a seeded parametric family (`initial_conditions`); targets come from a
finite-difference reference solver (`solve_reference`); `PDEDataset` wraps both in the
project's data-set API, returning (u0 [b, nx], u [b, nt, nx]) float32 pairs.

The grid names its equation (`PDEGrid.equation`): "fisher_kpp" (this module) or
"diffusion_sorption" (`diffusion_sorption.py`, PI-HC-MoE's own 1D problem). `FAMILIES` maps each to
its initial conditions, reference solver and boundary rows; `PDEDataset` reads only that table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from pydantic import Field

from dist_train.config.options import Options
from dist_train.data import diffusion_sorption
from dist_train.data.base import DataInfo, DatasetSpec, InMemoryDataset
from dist_train.errors import UserError

_CHUNK = 256  # initial conditions solved at once: bounds the float64 work arrays to a few tens of MB


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


@dataclass(frozen=True)
class BoundaryRow:
    """The condition on one side at every time level j >= 1: (1 - kappa) u[j, edge] + kappa u[j, inner] = value,
    `inner` the edge's neighbouring column. kappa = 0: Dirichlet u = value; kappa > 0: a Robin condition
    in one-sided difference form."""

    value: float
    kappa: float


def boundary_rows(grid: PDEGrid) -> tuple[BoundaryRow, BoundaryRow]:
    """(x = 0, x = 1) conditions of `grid`'s equation."""
    return FAMILIES[grid.equation].boundary(grid)


def sample_initial_conditions(grid: PDEGrid, n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, nx] float64 initial conditions of `grid`'s equation family."""
    return FAMILIES[grid.equation].initial_conditions(n, grid.nx, generator)


def reference_solution(u0: torch.Tensor, grid: PDEGrid) -> torch.Tensor:
    """[B, nt, nx] float64 reference solution of `grid`'s equation from u0 [B, nx]."""
    return FAMILIES[grid.equation].solve_reference(u0, grid)


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


class PDEDataset(InMemoryDataset):
    """(u0 float32 [nx], u float32 [nt, nx]) pairs of `grid`'s equation; a fixed seeded split.

    The examples are i.i.d. draws from one generator seeded with `seed`, so the split needs no
    permutation: validation is the first `val_fraction`, test (when `test_fraction` > 0) the
    next `test_fraction`, training the rest; each requested split holds at least one example.
    512 examples at nx=128, nt=64 take about a second of one core to generate (the solver's
    matrix products dominate)."""

    def __init__(self, grid: PDEGrid, num_examples: int, seed: int, val_fraction: float,
                 test_fraction: float = 0.0):
        n = num_examples
        if n < 3:
            raise ValueError(f"PDEDataset needs at least 3 examples (one per split), got {n}")
        self.grid = grid
        u0 = sample_initial_conditions(grid, n, torch.Generator().manual_seed(seed))
        # Chunked: the solver's float64 work arrays grow with the batch.
        solution = torch.cat([reference_solution(u0[i:i + _CHUNK], grid).to(torch.float32)
                              for i in range(0, n, _CHUNK)])
        u0 = u0.to(torch.float32)
        n_val = min(max(1, round(n * val_fraction)), n - 1)
        n_test = min(max(1, round(n * test_fraction)), n - n_val - 1) if test_fraction > 0 else 0
        bounds = {"val": (0, n_val), "test": (n_val, n_val + n_test), "train": (n_val + n_test, n)}
        self._splits = {name: (u0[lo:hi], solution[lo:hi]) for name, (lo, hi) in bounds.items()}
        self.info = DataInfo(task="pde", grid=grid, vocab_size=None, input_shape=(grid.nx,), num_classes=None,
                             train_size=n - n_val - n_test, val_size=n_val, test_size=n_test)


@dataclass(frozen=True)
class Family:
    """What the data side knows of one equation: its initial conditions, reference solver and boundary rows."""

    initial_conditions: Callable[[int, int, torch.Generator], torch.Tensor]
    solve_reference: Callable[[torch.Tensor, PDEGrid], torch.Tensor]
    boundary: Callable[[PDEGrid], tuple[BoundaryRow, BoundaryRow]]
    check: Callable[[PDEGrid], None] = lambda grid: None  # ValueError for coefficients the scheme cannot take


def _zero_dirichlet(grid: PDEGrid) -> tuple[BoundaryRow, BoundaryRow]:
    return BoundaryRow(0.0, 0.0), BoundaryRow(0.0, 0.0)


# `PDEGrid.equation` -> its family; another PDE is another entry (and one in `moe.physics.RESIDUALS` and
# `moe.hard_constraint.CONSTRAINT_ROWS`).
FAMILIES: dict[str, Family] = {
    "fisher_kpp": Family(initial_conditions, solve_reference, _zero_dirichlet),
    "diffusion_sorption": Family(diffusion_sorption.initial_conditions, diffusion_sorption.solve_reference,
                                 diffusion_sorption.boundary_rows, diffusion_sorption.check_grid),
}


class PDEOptions(Options):
    num_examples: Optional[int] = Field(None, ge=20, description="Solutions generated in all (train + val + test); default 512.")
    seed: int = Field(0, description="Seed the initial conditions are drawn from (fixed apart from train.seed).")
    nx: int = Field(128, ge=3, description="Grid points in x on [0, 1] (boundaries included).")
    nt: int = Field(64, ge=2, description="Time levels on [0, t_end] (t = 0 included).")
    t_end: Optional[float] = Field(None, gt=0, description="Final time; default 1.0 (reaction_diffusion) / 500 (diffusion_sorption, PDEBench's).")
    nu: Optional[float] = Field(None, ge=0, description="Diffusion coefficient, nu of u_t = nu u_xx + rho u (1 - u) (default 0.005) or D of R(u) u_t = D u_xx (default 5e-4, PDEBench's).")


class ReactionDiffusionOptions(PDEOptions):
    rho: float = Field(1.0, ge=0, description="Reaction rate rho.")


class _PDESet(DatasetSpec):
    """A PDE family's solutions on a grid, generated by its reference solver (no download)."""

    task = "pde"
    options = PDEOptions
    equation: ClassVar[str] = ""  # PDEGrid.equation
    t_end: ClassVar[float] = 1.0  # defaults of the data.* keys left null
    nu: ClassVar[float] = 0.0

    @classmethod
    def rho(cls, own) -> float:
        return 0.0

    @classmethod
    def build(cls, cfg_data, block_size: int) -> PDEDataset:
        own = cfg_data.options()
        try:
            grid = PDEGrid(nx=own.nx, nt=own.nt, t_end=own.t_end if own.t_end is not None else cls.t_end,
                           nu=own.nu if own.nu is not None else cls.nu, rho=cls.rho(own), equation=cls.equation)
        except ValueError as err:  # a coefficient the scheme cannot take: one line, exit 2
            raise UserError(f"data: {err}") from None
        return PDEDataset(grid, own.num_examples or 512, own.seed, cfg_data.val_fraction, cfg_data.test_fraction or 0.0)


class ReactionDiffusion(_PDESet):
    """`data.name: reaction_diffusion`: 1D Fisher-KPP solutions (this module)."""

    options = ReactionDiffusionOptions
    equation, t_end, nu = "fisher_kpp", 1.0, 0.005

    @classmethod
    def rho(cls, own) -> float:
        return own.rho


class DiffusionSorption(_PDESet):
    """`data.name: diffusion_sorption`: PDEBench's 1D diffusion-sorption problem (`diffusion_sorption.py`)."""

    equation, t_end, nu = "diffusion_sorption", 500.0, 5e-4

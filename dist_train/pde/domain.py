"""Domain decomposition for the hard-constraint experts: which grid block each expert owns, the halo
its stencils read, the points it constrains, and which rank solves it.

The nt x nx grid is cut into `time_splits` bands of time levels x (K / time_splits) bands of columns,
as even as they go; expert k = (band a, column band c), k = a * Kx + c. An expert's solution covers
its own block; its Crank–Nicolson stencils also read one column left and right and one time level
before (the halo), where the block has a neighbour. The halo carries *basis values* b, evaluated
with the expert's own ω_k: each expert stays an independent problem (PI-HC-MoE's experts never
share ω), and the basis values it needs beyond its border are what crosses ranks.

Overlap (`moe.overlap` = o columns; 0, the paper's non-overlapping split, by default). An extension,
not in PI-HC-MoE: expert k constrains the PDE on its column band widened by o columns on each side
(clipped to the grid), solves its ω_k there, and keeps b·ω_k only on its own block — the restricted
additive Schwarz pattern of overlapping domain decomposition (Cai & Sarkis, SIAM J. Sci. Comput. 21,
1999), as overlapping-subdomain PINNs use it (FBPINNs, Moseley et al., 2023), applied once: there are
no Schwarz iterations between experts. Without it, a sub-problem has no condition at an interface and
neighbouring ω's need not agree there; BENCHMARKS.md (moe, converge size) measures what it changes.
Still no ω and no solution crosses between experts; only the basis block each expert receives grows.

Points (all in the expert's constrained region: its own block widened by the overlap; global index
conditions):
- residual: m_k points drawn without replacement (fixed seed per expert) from the region's points
  with j >= 1 and 1 <= i <= nx - 2, m_k = m // K (the first m % K experts take one more);
- initial condition: every point of the region with j = 0;
- boundary: every point of the region with i in {0, nx - 1} and j >= 1, each with its side's row
  (`grid.boundary_rows`: u = 0 for Fisher–KPP; u = 1 in, u = D u_x out for diffusion–sorption).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_train.errors import UserError
from dist_train.pde.constraint import ConstraintPoints
from dist_train.pde.grid import PDEGrid, boundary_rows


@dataclass(frozen=True)
class SubDomain:
    index: int
    t0: int  # own block: time levels [t0, t1), columns [x0, x1) (global indices)
    t1: int
    x0: int
    x1: int
    cx0: int  # constrained columns [cx0, cx1): the own columns widened by the overlap
    cx1: int
    ht0: int  # block with halo: [ht0, t1) x [hx0, hx1), around the constrained region
    hx0: int
    hx1: int

    @property
    def halo_shape(self) -> tuple[int, int]:
        return self.t1 - self.ht0, self.hx1 - self.hx0

    @property
    def own_shape(self) -> tuple[int, int]:
        return self.t1 - self.t0, self.x1 - self.x0

    def own_in_halo(self) -> tuple[slice, slice]:
        """The own block's rows and columns inside the halo block."""
        return (slice(self.t0 - self.ht0, self.t1 - self.ht0), slice(self.x0 - self.hx0, self.x1 - self.hx0))

    def ic_columns(self) -> torch.Tensor:
        """Global columns of this expert's initial-condition points (none unless it holds t = 0)."""
        return torch.arange(self.cx0, self.cx1) if self.t0 == 0 else torch.zeros(0, dtype=torch.long)


def _bands(n: int, parts: int) -> list[tuple[int, int]]:
    sizes = [n // parts + (1 if p < n % parts else 0) for p in range(parts)]
    starts = [sum(sizes[:p]) for p in range(parts)]
    return [(s, s + z) for s, z in zip(starts, sizes)]


def decompose(grid: PDEGrid, experts: int, time_splits: int = 1, overlap: int = 0) -> list[SubDomain]:
    """K sub-domains, each constraining `overlap` columns beyond its own on either side; UserError
    when K or the overlap does not fit the grid."""
    if experts % time_splits:
        raise UserError(f"moe.time_splits: {time_splits} does not divide moe.experts={experts}")
    kx = experts // time_splits
    # Every column band needs an interior column and every time band a level with j >= 1 to hold
    # residual points; the first time band also needs one besides t = 0.
    if kx > grid.nx - 2:
        raise UserError(f"moe.experts: {kx} sub-domains in space do not fit the {grid.nx - 2} interior "
                        f"columns of the grid (data.nx={grid.nx})")
    if time_splits > grid.nt - 1:
        raise UserError(f"moe.time_splits: {time_splits} time bands do not fit the {grid.nt - 1} time steps "
                        f"(data.nt={grid.nt})")
    if overlap < 0 or overlap >= grid.nx:
        raise UserError(f"moe.overlap: {overlap} columns must be at least 0 and below the grid's "
                        f"{grid.nx} columns (data.nx)")
    subs = []
    for a, (t0, t1) in enumerate(_bands(grid.nt, time_splits)):
        for c, (x0, x1) in enumerate(_bands(grid.nx, kx)):
            cx0, cx1 = max(x0 - overlap, 0), min(x1 + overlap, grid.nx)
            subs.append(SubDomain(index=a * kx + c, t0=t0, t1=t1, x0=x0, x1=x1, cx0=cx0, cx1=cx1,
                                  ht0=max(t0 - 1, 0), hx0=max(cx0 - 1, 0), hx1=min(cx1 + 1, grid.nx)))
    return subs


def constraint_points(sub: SubDomain, grid: PDEGrid, m_k: int, seed: int = 0) -> ConstraintPoints:
    """The expert's points in halo-block coordinates (see the module docstring)."""
    jj, ii = torch.meshgrid(torch.arange(sub.t0, sub.t1), torch.arange(sub.cx0, sub.cx1), indexing="ij")
    jj, ii = jj.flatten(), ii.flatten()
    eligible = (jj >= 1) & (ii >= 1) & (ii <= grid.nx - 2)
    ej, ei = jj[eligible], ii[eligible]
    if m_k > ej.numel():
        raise UserError(f"moe.points: expert {sub.index} would need {m_k} residual points but its sub-domain "
                        f"holds {ej.numel()} (grid {grid.nt} x {grid.nx}); lower moe.points or moe.experts")
    pick = torch.randperm(ej.numel(), generator=torch.Generator().manual_seed(seed * 1000 + sub.index))[:m_k]
    pick = pick.sort().values  # grid order: the rows of the least-squares problem do not depend on the draw order
    ic = jj == 0
    bc = (jj >= 1) & ((ii == 0) | (ii == grid.nx - 1))
    bc_j, bc_i = jj[bc], ii[bc]
    left, right = boundary_rows(grid)
    on_left = bc_i == 0
    side = lambda a, b: torch.where(on_left, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))  # noqa: E731
    kappa, value = side(left.kappa, right.kappa), side(left.value, right.value)
    inner = torch.where(on_left, 1, grid.nx - 2)  # the edge's neighbouring column (in the halo block)
    return ConstraintPoints(pde_j=ej[pick] - sub.ht0, pde_i=ei[pick] - sub.hx0,
                            ic_j=jj[ic] - sub.ht0, ic_i=ii[ic] - sub.hx0,
                            bc_j=bc_j - sub.ht0, bc_i=bc_i - sub.hx0,
                            bc_inner=inner - sub.hx0, bc_kappa=kappa, bc_value=value)


def points_per_expert(m: int, experts: int) -> list[int]:
    return [m // experts + (1 if k < m % experts else 0) for k in range(experts)]


def owner_of(expert: int, world: int) -> int:
    """Round-robin placement: several experts per rank when K > world."""
    return expert % world

"""The PDE models: a basis network f_θ and the constraint that turns its N basis functions into u.

f_θ is the basis network `model.name` names (`basis.py`, `basis_fno.py`), giving b [B, nt, nx, N]
from the initial values u0 [B, nx].

- `constraint="hard"`: u = b·ω_k on each expert's block, ω_k solved per sample from the discretised
  PDE (`experts.py`, `constraint.py`). K = moe.experts experts; K = 1 is one global constraint.
- `constraint="soft"`: u = b·w with a learned w ∈ R^N, trained on the same physics loss: the PDE
  holds only as far as the penalty pushes it (the soft-constraint baseline of PI-HC).

Both train on `physics.physics_loss` (residual + initial + boundary terms, no solution data) unless
moe.loss = "data" (mean squared error to the reference solution).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from dist_train.pde.constraint import LMOptions
from dist_train.pde.experts import ExpertLayer
from dist_train.pde.grid import PDEGrid
from dist_train.pde.physics import physics_loss


class PDEModel(nn.Module):
    task = "pde"

    def __init__(self, grid: PDEGrid, basis: nn.Module, n_basis: int, constraint: str,
                 experts: int = 1, points: int = 256, time_splits: int = 1, loss: str = "physics",
                 options: Optional[LMOptions] = None, group=None, replicas=None, overlap: int = 0):
        """`basis`: f_θ, mapping u0 [B, nx] to b [B, nt, nx, n_basis]."""
        super().__init__()
        self.grid, self.constraint, self.loss_kind = grid, constraint, loss
        self.basis = basis
        if constraint == "hard":
            self.experts = ExpertLayer(grid, experts, points, time_splits, options, group, replicas=replicas,
                                       overlap=overlap)
        else:  # the soft constraint's linear combination is learned, not solved
            self.weights = nn.Parameter(torch.randn(n_basis) / n_basis ** 0.5)

    def forward(self, u0: torch.Tensor) -> torch.Tensor:
        b = self.basis(u0)
        if self.constraint == "hard":
            return self.experts(b, u0)
        return b @ self.weights

    def loss(self, u: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """The training loss; `reference` [B, nt, nx] is the reference solution (its t = 0 level is u0)."""
        if self.loss_kind == "data":
            return (u - reference).pow(2).mean()
        return physics_loss(u, reference[:, 0], self.grid)

    def solver_stats(self) -> dict[str, float]:
        return self.experts.stats() if self.constraint == "hard" else {}

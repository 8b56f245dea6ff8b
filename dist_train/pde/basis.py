"""The PDE basis networks f_θ: N basis functions on a space-time grid, for the hard-constraint experts.
Each is a registered model (`dist_train.registry.MODELS`) whose spec builds it for the PDE task.

- `BasisMLP` (basis_mlp, the config's default): a small MLP applied at every grid point to
  [encode(u0), x, t] (DeepONet-style: the initial condition enters through a learned linear encoding,
  the point through its coordinates scaled to [0, 1]). A simplification of the paper's FNO basis,
  named in the README: cheaper on CPU, and pointwise.
- `BasisFNO` (basis_fno, `basis_fno.py`): the paper's kind of basis, a 2-D Fourier neural operator
  over (t, x).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pydantic import Field
from torch import nn

from dist_train.config.options import Options
from dist_train.models.spec import ModelSpec

if TYPE_CHECKING:
    from dist_train.pde.grid import PDEGrid


class BasisMLP(nn.Module):
    def __init__(self, grid: "PDEGrid", n_basis: int, width: int, n_layer: int, encoding: int = 32):
        super().__init__()
        self.encode = nn.Linear(grid.nx, encoding)
        dims = [encoding + 2] + [width] * n_layer
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(width, n_basis)
        tt, xx = torch.meshgrid(grid.t.float() / grid.t_end, grid.x.float(), indexing="ij")
        self.register_buffer("coords", torch.stack([xx, tt], -1), persistent=False)  # [nt, nx, 2]

    def forward(self, u0: torch.Tensor) -> torch.Tensor:
        nt, nx, _ = self.coords.shape
        code = self.encode(u0)[:, None, None, :].expand(-1, nt, nx, -1)
        h = torch.cat([code, self.coords.expand(u0.shape[0], -1, -1, -1)], -1)
        for block in self.blocks:
            h = block(h)
        return self.head(h)  # [B, nt, nx, N]


class BasisOptions(Options):
    n_layer: int = Field(4, ge=1, description="Hidden layers (basis_mlp) or Fourier layers (basis_fno).")
    width: int = Field(128, ge=1, description="Hidden units (basis_mlp) or channels (basis_fno).")


class BasisSpec(ModelSpec):
    """A basis network f_θ: the PDE task builds the whole model (`PDEModel`) around it, with the
    moe section's constraint, so the task calls `build_basis`, not `build`."""

    task = "pde"
    options = BasisOptions

    @classmethod
    def build_basis(cls, opts, grid: "PDEGrid", n_basis: int) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def build(cls, opts, info, block_size):
        raise NotImplementedError("a basis network is built by the PDE task (PDESolving.build_model)")


class BasisMLPSpec(BasisSpec):
    """`model.name: basis_mlp`."""

    @classmethod
    def build_basis(cls, opts, grid, n_basis):
        return BasisMLP(grid, n_basis, opts.width, opts.n_layer)

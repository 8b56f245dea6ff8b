"""The PDE basis networks f_θ: N basis functions on a space-time grid, for the hard-constraint experts.
`BASIS_MODELS` maps `model.name` to a builder(grid, n_basis, cfg_model).

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
from torch import nn

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


def _build_mlp(grid: "PDEGrid", n_basis: int, cfg_model) -> nn.Module:
    return BasisMLP(grid, n_basis, cfg_model.width, cfg_model.n_layer)


def _build_fno(grid: "PDEGrid", n_basis: int, cfg_model) -> nn.Module:
    from dist_train.pde.basis_fno import BasisFNO

    return BasisFNO(grid, n_basis, cfg_model.width, cfg_model.n_layer, modes=cfg_model.modes)


# model.name -> builder(grid, n_basis, cfg_model): a new basis network is one class and one line here
# (plus its name in `tasks/names.py` and the schema's Literal).
BASIS_MODELS = {"basis_mlp": _build_mlp, "basis_fno": _build_fno}


def build_basis(grid: "PDEGrid", n_basis: int, cfg_model) -> nn.Module:
    return BASIS_MODELS[cfg_model.name](grid, n_basis, cfg_model)

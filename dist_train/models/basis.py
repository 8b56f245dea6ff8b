"""The PDE basis network f_θ: N basis functions on a space-time grid, for the hard-constraint experts.

A small MLP applied at every grid point to [encode(u0), x, t] (DeepONet-style: the initial condition
enters through a learned linear encoding, the point through its coordinates scaled to [0, 1]).
A simplification of the paper's FNO basis, named in the README: cheaper on CPU, and pointwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from dist_train.data.pde import PDEGrid


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

"""A Fourier neural operator basis f_θ (model.name basis_fno): N basis functions on the space-time grid.

PI-HC-MoE (arXiv 2402.13412, §4) produces its basis functions with an FNO (Li et al., arXiv 2010.08895).
This one is the FNO-2D of Li et al. over the (t, x) grid:

    v_0 = P([u0(x), x, t]),                               lift: a pointwise linear map to `width` channels
    v_{l+1} = σ(W_l v_l + F⁻¹(R_l · F(v_l))),  l < L−1    (Li et al., Eq. (2) with the kernel of Eq. (4))
    v_L = W_{L−1} v_{L−1} + F⁻¹(R_{L−1} · F(v_{L−1}))     (no activation after the last layer)
    b = Q(v_L),                                           project: linear, GELU, linear to N

F is the 2-D real FFT over (t, x); R_l multiplies each kept mode (the lowest `modes` frequencies in
x, and the lowest `modes` of either sign in t) by a complex `width` × `width` matrix and zeroes the
rest; W_l is a pointwise linear map; σ is GELU. As in Li et al.'s code for non-periodic problems,
the lifted field is zero-padded by `pad` cells at the far end of t and of x before the Fourier
layers and cropped after, so the FFT's periodic wrap-around does not join t = T to t = 0.

The initial condition enters as a channel broadcast over t (the FNO's input is the initial state and
the grid), not through the DeepONet-style encoding of `BasisMLP`. The complex weights are stored
as real tensors [..., 2] (real, imaginary), so every backend, checkpoint and optimizer sees real
parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from dist_train.pde.basis import BasisOptions, BasisSpec

if TYPE_CHECKING:
    from dist_train.pde.grid import PDEGrid


class SpectralConv2d(nn.Module):
    """x [B, C_in, T, X] -> F⁻¹(R · F(x)) [B, C_out, T, X] with modes_t (of each sign) × modes_x kept."""

    def __init__(self, c_in: int, c_out: int, modes_t: int, modes_x: int):
        super().__init__()
        self.modes_t, self.modes_x = modes_t, modes_x
        scale = 1.0 / (c_in * c_out)  # Li et al.'s initialisation
        # [sign of the t frequency (low positive, low negative), C_in, C_out, modes_t, modes_x, re/im]
        self.weight = nn.Parameter(scale * torch.rand(2, c_in, c_out, modes_t, modes_x, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_t, n_x = x.shape[-2:]
        mt, mx = self.modes_t, self.modes_x
        # The FFT runs in fp32 at least (no half-precision FFTs on CPU; low precision here loses modes).
        real = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        spectrum = torch.fft.rfft2(real)  # [B, C_in, T, X // 2 + 1]
        w = torch.view_as_complex(self.weight.to(real.dtype))
        out = spectrum.new_zeros(x.shape[0], w.shape[2], n_t, n_x // 2 + 1)
        out[:, :, :mt, :mx] = torch.einsum("bitx,iotx->botx", spectrum[:, :, :mt, :mx], w[0])
        out[:, :, -mt:, :mx] = torch.einsum("bitx,iotx->botx", spectrum[:, :, -mt:, :mx], w[1])
        return torch.fft.irfft2(out, s=(n_t, n_x)).to(x.dtype)


class BasisFNO(nn.Module):
    def __init__(self, grid: "PDEGrid", n_basis: int, width: int, n_layer: int, modes: int = 12, pad: int = 8):
        super().__init__()
        self.pad = pad
        # At most the frequencies the padded grid has: t's of each sign must not meet, x's fit the rfft.
        modes_t = max(1, min(modes, (grid.nt + pad) // 2))
        modes_x = max(1, min(modes, (grid.nx + pad) // 2 + 1))
        self.lift = nn.Linear(3, width)
        self.spectral = nn.ModuleList(SpectralConv2d(width, width, modes_t, modes_x) for _ in range(n_layer))
        self.pointwise = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(n_layer))
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, n_basis))
        tt, xx = torch.meshgrid(grid.t.float() / grid.t_end, grid.x.float(), indexing="ij")
        self.register_buffer("coords", torch.stack([xx, tt], -1), persistent=False)  # [nt, nx, 2]

    def forward(self, u0: torch.Tensor) -> torch.Tensor:
        nt, nx, _ = self.coords.shape
        b = u0.shape[0]
        field = torch.cat([u0[:, None, :, None].expand(-1, nt, -1, -1).to(self.coords.dtype),
                           self.coords.expand(b, -1, -1, -1)], -1)  # [B, nt, nx, 3]
        v = F.pad(self.lift(field).permute(0, 3, 1, 2), (0, self.pad, 0, self.pad))  # [B, width, T, X]
        last = len(self.spectral) - 1
        for i, (spectral, pointwise) in enumerate(zip(self.spectral, self.pointwise)):
            v = spectral(v) + pointwise(v)
            if i < last:
                v = F.gelu(v)
        v = v[:, :, :nt, :nx].permute(0, 2, 3, 1)  # crop the padding: [B, nt, nx, width]
        return self.head(v)  # [B, nt, nx, N]


class FNOOptions(BasisOptions):
    modes: int = Field(12, ge=1, description="Fourier modes kept per axis in each layer (the lowest in x, the lowest of either sign in t; capped at what the padded grid has).")


class BasisFNOSpec(BasisSpec):
    """`model.name: basis_fno`: the paper's kind of basis."""

    options = FNOOptions

    @classmethod
    def build_basis(cls, opts, grid, n_basis):
        return BasisFNO(grid, n_basis, opts.width, opts.n_layer, modes=opts.modes)

"""The FNO basis (model.name basis_fno): its Fourier layer against the discrete Fourier transform written
out in the test, and the network's shapes, padding and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from dist_train.pde.basis_fno import BasisFNO, SpectralConv2d
from dist_train.pde.grid import PDEGrid


def _fourier_layer_by_hand(v: torch.Tensor, w: torch.Tensor, mt: int, mx: int) -> torch.Tensor:
    """y = F⁻¹(R·F(v)) for real v [B, I, T, X] from the DFT's defining sums, in float64.

    w [2, I, O, mt, mx] complex: w[0] multiplies t frequencies 0..mt−1, w[1] frequencies T−mt..T−1
    (the lowest negative ones); x frequencies 0..mx−1. A real signal's spectrum is Hermitian, so the
    inverse over x counts frequency l > 0 twice (its mirror −l is its conjugate) and takes real parts.
    """
    B, I, T, X = v.shape
    O = w.shape[2]
    t, x = torch.arange(T, dtype=torch.float64), torch.arange(X, dtype=torch.float64)
    rows = [(k, w[0][:, :, k]) for k in range(mt)] + [(T - mt + j, w[1][:, :, j]) for j in range(mt)]
    y = torch.zeros(B, O, T, X, dtype=torch.float64)
    for k, wk in rows:
        for l in range(mx):
            phase = torch.exp(-2j * math.pi * (k * t[:, None] / T + l * x[None, :] / X))  # [T, X]
            V = (v.to(torch.complex128) * phase).sum((-2, -1))  # [B, I]: the (k, l) Fourier coefficient
            Y = torch.einsum("bi,io->bo", V, wk[:, :, l])  # [B, O]
            back = torch.exp(2j * math.pi * (k * t[:, None] / T + l * x[None, :] / X)) / (T * X)
            y += (1 if l == 0 else 2) * (Y[:, :, None, None] * back).real
    return y


def test_fourier_layer_matches_the_dft_written_out() -> None:
    torch.manual_seed(0)
    layer = SpectralConv2d(2, 3, modes_t=2, modes_x=3).double()
    with torch.no_grad():
        layer.weight.normal_()  # not the small uniform init: every weight and its sign matters
    v = torch.randn(2, 2, 6, 8, dtype=torch.float64)
    expected = _fourier_layer_by_hand(v, torch.view_as_complex(layer.weight), 2, 3)
    torch.testing.assert_close(layer(v), expected, rtol=1e-10, atol=1e-12)


def test_fourier_layer_drops_the_modes_it_does_not_keep() -> None:
    layer = SpectralConv2d(1, 1, modes_t=1, modes_x=2).double()
    x = torch.arange(8, dtype=torch.float64).expand(8, 8)  # [t, x]
    high = torch.cos(2 * math.pi * 3 * x / 8)[None, None]  # x frequency 3: not kept
    low = torch.cos(2 * math.pi * 1 * x / 8)[None, None]  # x frequency 1, t frequency 0: kept
    assert layer(high).abs().max() < 1e-12
    assert layer(low).abs().max() > 1e-3


def _grid() -> PDEGrid:
    return PDEGrid(nx=17, nt=9, t_end=0.5, nu=0.01, rho=1.0)


def test_basis_fno_shapes_modes_cap_and_gradients() -> None:
    torch.manual_seed(0)
    grid = _grid()
    net = BasisFNO(grid, n_basis=5, width=8, n_layer=3, modes=50, pad=4)
    # 50 modes asked: capped at what the padded 13 x 21 grid has (6 of each sign in t, 11 in x)
    assert (net.spectral[0].modes_t, net.spectral[0].modes_x) == (6, 11)
    u0 = torch.rand(3, grid.nx)
    b = net(u0)
    assert b.shape == (3, grid.nt, grid.nx, 5) and bool(torch.isfinite(b).all())
    b.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_basis_fno_sees_the_initial_condition() -> None:
    torch.manual_seed(0)
    grid = _grid()
    net = BasisFNO(grid, n_basis=4, width=8, n_layer=2, modes=4)
    u0 = torch.rand(2, grid.nx)
    a, b = net(u0), net(u0.flip(0))
    torch.testing.assert_close(a.flip(0), b)  # per sample
    assert (a[0] - a[1]).abs().max() > 1e-4  # different initial conditions, different bases


@pytest.mark.parametrize("name", ["basis_mlp", "basis_fno"])
def test_pde_task_builds_the_named_basis(name: str) -> None:
    from dist_train.config.schema import Config
    from dist_train.data import build_dataset
    from dist_train.pde.basis import BasisMLP
    from dist_train.tasks import get_task

    own = {"modes": 3} if name == "basis_fno" else {}  # basis_mlp has no Fourier modes: the key would be refused
    cfg = Config.model_validate({"model": {"name": name, "n_layer": 2, "width": 8, **own},
                                 "data": {"name": "reaction_diffusion", "nx": 17, "nt": 9, "num_examples": 20},
                                 "moe": {"basis": 5, "experts": 2, "points": 32}})
    model = get_task("pde").build_model(cfg.model, build_dataset(cfg.data, cfg.model.block_size).info, cfg.moe)
    assert isinstance(model.basis, BasisFNO if name == "basis_fno" else BasisMLP)
    assert model(torch.rand(2, 17)).shape == (2, 9, 17)

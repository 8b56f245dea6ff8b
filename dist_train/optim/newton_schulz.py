"""Newton–Schulz orthogonalisation: the approximate polar factor U·Vᵀ of a matrix G = U·S·Vᵀ.

Two coefficient schedules for the quintic iteration X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ:
- `quintic`: Keller Jordan's fixed (a, b, c) = (3.4445, −4.7750, 2.0315), five steps; singular
  values land roughly in [0.5, 1.5] rather than at 1, which Muon tolerates by design.
- `polar_express`: Amsel et al., "The Polar Express" (arXiv 2505.16932), Algorithm 1: a different
  minimax-optimal (a, b, c) per step, each step but the last divided by a 1.01 safety factor, and
  the input normalised by 1.01·‖G‖_F; steps beyond the table reuse its last (converged) triple.

Works on a batch [..., m, n] of same-shape matrices at once (one bmm per product instead of a
Python loop), in the dtype asked for (bf16 is the GPU default for speed; tests use fp64).
"""

from __future__ import annotations

from itertools import chain, repeat
from typing import Iterable, Optional

import torch

QUINTIC = (3.4445, -4.7750, 2.0315)

_POLAR_EXPRESS_RAW = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
_SAFETY = 1.01
POLAR_EXPRESS = [(a / _SAFETY, b / _SAFETY**3, c / _SAFETY**5) for a, b, c in _POLAR_EXPRESS_RAW[:-1]]
POLAR_EXPRESS.append(_POLAR_EXPRESS_RAW[-1])

COEFFICIENTS = ("quintic", "polar_express")


def coefficient_schedule(name: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) used at each of `steps` iterations."""
    if name == "quintic":
        table: Iterable = repeat(QUINTIC)
    elif name == "polar_express":
        table = chain(POLAR_EXPRESS, repeat(POLAR_EXPRESS[-1]))
    else:
        raise ValueError(f"Newton-Schulz coefficients must be one of {COEFFICIENTS}, got {name!r}")
    return [abc for abc, _ in zip(table, range(steps))]


def ns_flops(m: int, n: int, steps: int) -> int:
    """FLOPs of `steps` iterations on one m×n matrix (after transposing so m ≤ n):
    A = X·Xᵀ (2m²n), A² (2m³), B·X (2m²n) per step."""
    m, n = min(m, n), max(m, n)
    return steps * (4 * m * m * n + 2 * m ** 3)


def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients: str = "quintic",
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Orthogonalise each trailing m×n matrix of `G` ([..., m, n]); returns `G`'s dtype and shape.

    Works on the wide orientation (m ≤ n) so the Gram matrix A is the smaller one.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs matrices, got a tensor of shape {tuple(G.shape)}")
    X = G.to(dtype) if dtype is not None else G
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    norm = X.norm(dim=(-2, -1), keepdim=True)
    if coefficients == "polar_express":
        norm = norm * _SAFETY
    X = X / (norm + 1e-7)
    for a, b, c in coefficient_schedule(coefficients, steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)

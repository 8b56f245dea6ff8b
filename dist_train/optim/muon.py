"""Muon and NorMuon: the per-matrix update rules (the distributed step is matrix.MatrixOptimizer).

Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks"):
    M ← μ·M + G;   U = G + μ·M (Nesterov) or U = M;   O = NS(U)
    W ← W·(1 − lr·wd) − lr·s·O,   s = √max(1, m/n) ("keller") or 0.2·√max(m, n) ("match_rms_adamw")

NorMuon (Li et al., arXiv 2510.05491, Algorithm 1), the paper rule by default:
    M ← β1·M + (1−β1)·G;   O = NS(M)
    v ← β2·v + (1−β2)·mean_cols(O ⊙ O)            (one value per row: per output neuron)
    Ô = O / (√v + ε);   η̂ = 0.2·η·√(m·n) / ‖Ô‖_F
    W ← W − η·λ·W − η̂·Ô
`variant="reference"` follows the authors' code instead: Nesterov on (U = (1−β1)·G + β1·M) and Ô
rescaled to O's Frobenius norm, then × √max(1, m/n), step −η·(that). One simplification in both:
ε is added to √v (the paper's form); the code clamps v before rsqrt, which differs only for v ≈ 0.

Both keep AdamW (torch's functional implementation) for param groups with algorithm="adamw".
Conv kernels are orthogonalised as their (out, in·kh·kw) flattening.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from dist_train.optim.matrix import MatrixOptimizer, _local, momentum_view, row_state, sqrt_max_ratio

LR_SCALES = ("keller", "match_rms_adamw")


def muon_scale(kind: str, m: int, n: int) -> float:
    if kind == "keller":
        return sqrt_max_ratio(m, n)
    if kind == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    raise ValueError(f"lr_scale must be one of {LR_SCALES}, got {kind!r}")


class Muon(MatrixOptimizer):
    """Muon with an AdamW fallback. In one process it is an ordinary torch optimizer; with a process
    group (or FSDP2 DTensor parameters) every matrix is orthogonalised by exactly one rank (under
    HSDP, one rank of each replica group: see matrix.py).

    Param groups: `algorithm="muon"` (default) for hidden matrices (2-D or more; conv kernels are
    flattened), `algorithm="adamw"` with `betas`/`eps` for the rest.
    """

    algorithm = "muon"

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, lr_scale: str = "keller", betas=(0.9, 0.95), eps: float = 1e-8,
                 ns_steps: int = 5, ns_coefficients: str = "quintic", ns_dtype: Optional[torch.dtype] = None,
                 process_group="auto", owner_compute: bool = True):
        muon_scale(lr_scale, 1, 1)  # validates the name
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                                  "weight_decay": weight_decay, "lr_scale": lr_scale, "betas": betas,
                                  "eps": eps},
                         ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_dtype=ns_dtype,
                         process_group=process_group, owner_compute=owner_compute)

    def _momentum(self, state, grad, group):
        mu = group["momentum"]
        buf = momentum_view(state, "momentum_buffer", grad.shape[1])
        buf.mul_(mu).add_(grad)
        return grad + mu * buf if group["nesterov"] else buf.clone()

    def _direction(self, state, ortho, group):
        return ortho, [ortho.new_zeros(())]

    def _apply(self, weight, direction, sq, group, shape):
        m, n = shape
        lr = group["lr"]
        weight.mul_(1 - lr * group["weight_decay"])
        weight.add_(direction, alpha=-lr * muon_scale(group["lr_scale"], m, n))


class NorMuon(MatrixOptimizer):
    """NorMuon (arXiv 2510.05491): Muon's orthogonalised momentum, then per-row (per-neuron) second-
    moment normalisation, with the update's RMS fixed at 0.2·lr so AdamW's lr and wd carry over."""

    algorithm = "normuon"
    VARIANTS = ("paper", "reference")

    def __init__(self, params, lr: float = 0.02, betas=(0.95, 0.95), weight_decay: float = 0.0,
                 eps: float = 1e-8, variant: str = "paper", nesterov: Optional[bool] = None,
                 adamw_betas=(0.9, 0.95), adamw_eps: float = 1e-8, ns_steps: int = 5,
                 ns_coefficients: str = "quintic", ns_dtype: Optional[torch.dtype] = None,
                 process_group="auto", owner_compute: bool = True):
        if variant not in self.VARIANTS:
            raise ValueError(f"NorMuon variant must be one of {self.VARIANTS}, got {variant!r}")
        if nesterov is None:
            nesterov = variant == "reference"
        # The matrix rule's (β1, β2, ε) are kept apart from AdamW's: groups default to AdamW's under
        # `betas`/`eps`, the matrix ones read `normuon_betas`/`normuon_eps`.
        super().__init__(params, {"lr": lr, "normuon_betas": betas, "normuon_eps": eps, "variant": variant,
                                  "nesterov": nesterov, "weight_decay": weight_decay,
                                  "betas": adamw_betas, "eps": adamw_eps},
                         ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_dtype=ns_dtype,
                         process_group=process_group, owner_compute=owner_compute)

    def _init_state(self, p):
        return {"momentum_buffer": torch.zeros_like(p), "v": row_state(p)}

    def _momentum(self, state, grad, group):
        beta1 = group["normuon_betas"][0]
        buf = momentum_view(state, "momentum_buffer", grad.shape[1])
        buf.lerp_(grad, 1 - beta1)
        return grad.lerp(buf, beta1) if group["nesterov"] else buf.clone()

    def _direction(self, state, ortho, group):
        beta2, eps = group["normuon_betas"][1], group["normuon_eps"]
        v = _local(state["v"])
        v.lerp_(ortho.square().mean(dim=1), 1 - beta2)
        normed = ortho / (v.sqrt() + eps).unsqueeze(1)
        return normed, [normed.square().sum(), ortho.square().sum()]

    def _apply(self, weight, direction, sq, group, shape):
        m, n = shape
        lr = group["lr"]
        normed_sq, ortho_sq = sq[0], sq[1]
        if group["variant"] == "paper":
            step = 0.2 * lr * math.sqrt(m * n) / (float(normed_sq.sqrt()) + 1e-12)
        else:
            step = lr * float(ortho_sq.sqrt()) / (float(normed_sq.sqrt()) + 1e-12) * sqrt_max_ratio(m, n)
        weight.mul_(1 - lr * group["weight_decay"])
        weight.add_(direction, alpha=-step)

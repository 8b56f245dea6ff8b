"""Differentiable hard-constraint layer (PI-HC, Négiar et al. ICLR 2023; PI-HC-MoE, Chalapathi et al.
arXiv 2402.13412) for one expert's block of a space-time grid.

A network gives N basis functions b on the block; the solution is u = b·ω with

    ω*(b) = argmin_ω L(ω, b),   L = ½‖r_pde‖² + ½‖r_ic‖² + ½‖r_bc‖² + ½ ridge ‖ω‖²        (1)

solved per sample by Levenberg–Marquardt in float64 (damped steps δ = −(M + λ diag(JᵀJ + ridge I))⁻¹∇L, the
model matrix M either the exact Hessian H of (2) (`hessian="exact"`, the default) or Gauss–Newton's
JᵀJ + ridge I (`"gauss_newton"`, classic LM as PI-HC uses it; see `LMOptions`)). The backward pass does not unroll the solver:
at the optimum g(ω*, b) = ∇_ω L = Jᵀr + ridge ω = 0, so by the implicit function theorem

    dω*/db = −H⁻¹ ∂g/∂b,   H = ∂g/∂ω = JᵀJ + ridge I + Σ_rows r_row ∇²_ω r_row             (2)

(the full Hessian, not Gauss–Newton), and a cotangent v = dLoss/dω* becomes
dLoss/db = −(∂g/∂b)ᵀ μ with H μ = v: one linear solve per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, NamedTuple, Optional

import torch
from torch.autograd.function import once_differentiable

from dist_train.pde.sorption import retardation_derivatives

Tensor = torch.Tensor
_BC_ROW_FIELDS = ("bc_inner", "bc_kappa", "bc_value")


@dataclass(frozen=True, eq=False)
class ConstraintPoints:
    """Block-local integer grid indices (1-D, possibly empty) of the PDE residual points, the
    initial-condition points and the boundary points.

    A boundary row is (1 − κ) u[j, i] + κ u[j, bc_inner] = value (`family.BoundaryRow`): `bc_inner`
    the edge's neighbouring column, `bc_kappa` and `bc_value` float per row. Left out (None), every
    boundary row is u[j, i] = 0 (homogeneous Dirichlet)."""

    pde_j: Tensor
    pde_i: Tensor
    ic_j: Tensor
    ic_i: Tensor
    bc_j: Tensor
    bc_i: Tensor
    bc_inner: Optional[Tensor] = None
    bc_kappa: Optional[Tensor] = None
    bc_value: Optional[Tensor] = None

    def __post_init__(self) -> None:
        for kind in ("pde", "ic", "bc"):
            j, i = getattr(self, f"{kind}_j"), getattr(self, f"{kind}_i")
            for t in (j, i):
                if t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                    raise ValueError(f"hard constraint: {kind} indices must be 1-D integer tensors, got {t.dtype} {tuple(t.shape)}")
            if j.numel() != i.numel():
                raise ValueError(f"hard constraint: {kind}_j has {j.numel()} entries but {kind}_i has {i.numel()}")
        given = [f for f in _BC_ROW_FIELDS if getattr(self, f) is not None]
        if given and len(given) != len(_BC_ROW_FIELDS):
            raise ValueError(f"hard constraint: give all of {', '.join(_BC_ROW_FIELDS)} or none (got {', '.join(given)})")
        for f in given:
            if getattr(self, f).shape != self.bc_j.shape:
                raise ValueError(f"hard constraint: {f} has shape {tuple(getattr(self, f).shape)}, "
                                 f"the boundary rows {tuple(self.bc_j.shape)}")

    def to(self, device) -> "ConstraintPoints":
        return ConstraintPoints(*(None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                  for f in fields(self)))

    def validate(self, tb: int, xb: int) -> None:
        """Raise ValueError naming the first point outside the block (or, for PDE points, outside the
        interior j >= 1, 1 <= i <= Xb-2 that the Crank–Nicolson stencil needs)."""
        bounds = {"pde": (1, tb - 1, 1, xb - 2), "ic": (0, tb - 1, 0, xb - 1), "bc": (0, tb - 1, 0, xb - 1)}
        if self.bc_inner is not None:
            bad = (self.bc_inner < 0) | (self.bc_inner > xb - 1)
            if bool(bad.any()):
                k = int(bad.nonzero()[0, 0])
                raise ValueError(f"hard constraint: boundary row #{k}'s neighbouring column {int(self.bc_inner[k])} "
                                 f"is outside 0 <= i <= {xb - 1} of a block of Xb={xb}")
        for kind, (j_lo, j_hi, i_lo, i_hi) in bounds.items():
            j, i = getattr(self, f"{kind}_j"), getattr(self, f"{kind}_i")
            bad = (j < j_lo) | (j > j_hi) | (i < i_lo) | (i > i_hi)
            if bool(bad.any()):
                k = int(bad.nonzero()[0, 0])
                raise ValueError(f"hard constraint: {kind} point #{k} (j={int(j[k])}, i={int(i[k])}) is outside "
                                 f"{j_lo} <= j <= {j_hi}, {i_lo} <= i <= {i_hi} of a block of Tb={tb}, Xb={xb}")


class Stencil(NamedTuple):
    """Basis rows [B, m, N] at the Crank–Nicolson stencil: P = b[j,i], Q = b[j-1,i], left/right neighbours."""

    p: Tensor
    q: Tensor
    p_left: Tensor
    p_right: Tensor
    q_left: Tensor
    q_right: Tensor


@dataclass(frozen=True)
class FisherKPP:
    """u_t = nu u_xx + rho u(1-u), Crank–Nicolson. Everything PDE-specific lives here (another PDE is
    another class with `gather`, `residual_and_jacobian` and `hessian_term`). Rows are scaled by dt:

        dt·R = (u_P − u_Q) − c[(u_P− − 2u_P + u_P+) + (u_Q− − 2u_Q + u_Q+)] − dt·rho/2 [u_P(1−u_P) + u_Q(1−u_Q)],
        c = nu·dt / (2 dx²),  P = (j,i), Q = (j−1,i), ± = i±1.
    """

    nu: float
    rho: float
    dt: float
    dx: float

    def gather(self, b: Tensor, j: Tensor, i: Tensor) -> Stencil:
        return Stencil(b[:, j, i], b[:, j - 1, i], b[:, j, i - 1], b[:, j, i + 1], b[:, j - 1, i - 1], b[:, j - 1, i + 1])

    def linear_rows(self, s: Stencil) -> Tensor:
        """Lin [B, m, N]: the part of dt·R linear in ω, incl. the linear −dt·rho/2 (u_P + u_Q) of the reaction
        (so Lin is also the Jacobian at u = 0, i.e. the problem linearised there)."""
        c = self.nu * self.dt / (2.0 * self.dx ** 2)
        lap = (s.p_left - 2.0 * s.p + s.p_right) + (s.q_left - 2.0 * s.q + s.q_right)
        return (s.p - s.q) - c * lap - 0.5 * self.dt * self.rho * (s.p + s.q)

    def residual_and_jacobian(self, s: Stencil, omega: Tensor) -> tuple[Tensor, Tensor]:
        """r = Lin ω + dt·rho/2 (u_P² + u_Q²);  J = Lin + dt·rho (u_P P + u_Q Q)
        = Lin_diffusion − dt·rho/2 [(1 − 2u_P) P + (1 − 2u_Q) Q]."""
        lin = self.linear_rows(s)
        u_p = torch.einsum("bmn,bn->bm", s.p, omega)
        u_q = torch.einsum("bmn,bn->bm", s.q, omega)
        r = torch.einsum("bmn,bn->bm", lin, omega) + 0.5 * self.dt * self.rho * (u_p ** 2 + u_q ** 2)
        jac = lin + self.dt * self.rho * (u_p.unsqueeze(-1) * s.p + u_q.unsqueeze(-1) * s.q)
        return r, jac

    def hessian_term(self, s: Stencil, omega: Tensor, weights: Tensor) -> Tensor:
        """Σ_rows w_row ∇²_ω r_row [B, N, N], with ∇²_ω r_row = dt·rho (P Pᵀ + Q Qᵀ) (independent of ω)."""
        wp = weights.unsqueeze(-1) * s.p
        wq = weights.unsqueeze(-1) * s.q
        return self.dt * self.rho * (wp.transpose(1, 2) @ s.p + wq.transpose(1, 2) @ s.q)


@dataclass(frozen=True)
class DiffusionSorption:
    """R(u) u_t = D u_xx (`sorption.py`), Crank–Nicolson with R at the mean of the two
    levels, rows scaled by dt:

        dt·R = R(ū)(u_P − u_Q) − c[(u_P− − 2u_P + u_P+) + (u_Q− − 2u_Q + u_Q+)],  ū = (u_P + u_Q)/2,  c = D·dt/(2 dx²).

    With d = P − Q and a = P + Q (basis rows), the Jacobian is R(ū) d + R'(ū)(u_P − u_Q) a/2 − c·lap and
    the second derivative of a row is R'(ū)/2 (d aᵀ + a dᵀ) + R''(ū)(u_P − u_Q)/4 a aᵀ."""

    nu: float  # D
    dt: float
    dx: float

    gather = FisherKPP.gather

    def _levels(self, s: Stencil, omega: Tensor) -> tuple[Tensor, Tensor]:
        return torch.einsum("bmn,bn->bm", s.p, omega), torch.einsum("bmn,bn->bm", s.q, omega)

    def residual_and_jacobian(self, s: Stencil, omega: Tensor) -> tuple[Tensor, Tensor]:
        c = self.nu * self.dt / (2.0 * self.dx ** 2)
        lap = (s.p_left - 2.0 * s.p + s.p_right) + (s.q_left - 2.0 * s.q + s.q_right)
        u_p, u_q = self._levels(s, omega)
        r0, r1, _ = retardation_derivatives((u_p + u_q) / 2)
        rise = u_p - u_q
        r = r0 * rise - c * torch.einsum("bmn,bn->bm", lap, omega)
        jac = r0.unsqueeze(-1) * (s.p - s.q) + (0.5 * r1 * rise).unsqueeze(-1) * (s.p + s.q) - c * lap
        return r, jac

    def hessian_term(self, s: Stencil, omega: Tensor, weights: Tensor) -> Tensor:
        u_p, u_q = self._levels(s, omega)
        _, r1, r2 = retardation_derivatives((u_p + u_q) / 2)
        d, a = s.p - s.q, s.p + s.q
        w1 = (0.5 * weights * r1).unsqueeze(-1)
        w2 = (0.25 * weights * r2 * (u_p - u_q)).unsqueeze(-1)
        return (w1 * d).transpose(1, 2) @ a + (w1 * a).transpose(1, 2) @ d + (w2 * a).transpose(1, 2) @ a


# `PDEGrid.equation` -> the rows the constraint enforces, built from the grid (another PDE: one more entry)
CONSTRAINT_ROWS: dict[str, Callable] = {
    "fisher_kpp": lambda grid: FisherKPP(nu=grid.nu, rho=grid.rho, dt=grid.dt, dx=grid.dx),
    "diffusion_sorption": lambda grid: DiffusionSorption(nu=grid.nu, dt=grid.dt, dx=grid.dx),
}


ConstraintRows = FisherKPP | DiffusionSorption


@dataclass(frozen=True)
class LMOptions:
    """Levenberg–Marquardt settings. A sample stops, its ω frozen, at the first of two tests:

    - gradient (converged): ‖∇L‖∞ <= tol · max(1, ‖∇L(ω=0)‖∞). The gradient at ω = 0 is −Aᵀy, the
      problem's own scale (relative for large data, absolute for small), and unlike the gradient at the
      (already good) linearised start it does not shrink the threshold for samples whose start happens
      to be close.
    - cost (stalled): a trial step is rejected although the step's model (below) predicted a decrease
      of at most ftol · L. This is MINPACK's ftol test (Moré, Garbow & Hillstrom, User Guide for
      MINPACK-1, ANL-80-74, 1980: predicted and actual relative reductions both <= ftol), narrowed to rejected steps so
      that on a smooth problem the gradient test still decides (a step with a tiny predicted decrease
      is only rejected at rounding level or at a kink). Without it a sample whose gradient test
      rounding or a kink keeps out of reach (diffusion–sorption's R(u) had one at its floor until it
      was made smooth) spends the rest of max_iter on rejected steps while λ grows, and a batched
      solve runs as long as its slowest sample. ftol = 0 turns the test off.

    The step's model matrix (`hessian`): "exact" is H of (2), JᵀJ + ridge I plus the rows' second
    derivatives weighted by their residuals (Newton steps under Levenberg–Marquardt damping, a
    trust-region Newton method); "gauss_newton" drops the second-order term (classic LM). An extension
    of PI-HC, which uses Gauss–Newton: the constrained problems are not small-residual problems (L stays
    O(1) at the optimum: m rows, N unknowns), so Gauss–Newton converges only linearly, and on
    diffusion–sorption's first time band (the front entering, R(u) steep near u = 0) it leaves samples
    with ‖∇L‖∞ ~ 1 after 50 iterations, where the implicit backward (which assumes ∇L = 0) is wrong.
    The exact model converges those in about 15. Away from the optimum H can be indefinite: where
    H + λD is not positive definite that sample takes the Gauss–Newton step instead (definite with
    ridge > 0), so the method is Newton near the optimum and Gauss–Newton where Newton has no descent
    model (raising λ until H + λD is definite instead took twice the iterations on diffusion–sorption).
    The damping's diagonal D is Gauss–Newton's in both cases (positive, ≥ ridge).
    """

    max_iter: int = 50
    tol: float = 1e-10
    damping0: float = 1e-3
    ridge: float = 1e-4
    ftol: float = 1e-12
    hessian: str = "exact"

    def __post_init__(self) -> None:
        if self.hessian not in ("exact", "gauss_newton"):
            raise ValueError(f"hard constraint: LMOptions.hessian must be 'exact' or 'gauss_newton', got {self.hessian!r}")


@dataclass(frozen=True)
class HardConstraintInfo:
    iterations: int        # max LM iterations over samples (each trial step, accepted or not, counts)
    mean_iterations: float
    grad_norm: float       # max over samples of the final ‖∇L‖∞
    cost: float            # mean over samples of the final L
    fallbacks: int         # Cholesky failures answered by raising that sample's damping
    unconverged: int       # samples that met neither stopping test within max_iter (reported, not raised)
    stalled: int = 0       # samples stopped by the cost test (ftol) with ‖∇L‖∞ still above the gradient test


def _rows(b: Tensor, u0: Tensor, pts: ConstraintPoints, pde: ConstraintRows, omega: Tensor):
    """All rows r [B, M], J [B, M, N] of (1), plus the PDE stencil and the PDE part of r."""
    st = pde.gather(b, pts.pde_j, pts.pde_i)
    r_pde, j_pde = pde.residual_and_jacobian(st, omega)
    b_ic, b_bc = b[:, pts.ic_j, pts.ic_i], b[:, pts.bc_j, pts.bc_i]
    r_ic = torch.einsum("bmn,bn->bm", b_ic, omega) - u0
    if pts.bc_kappa is None:  # homogeneous Dirichlet rows
        r_bc = torch.einsum("bmn,bn->bm", b_bc, omega)
    else:  # (1 − κ) u[edge] + κ u[inner] = value
        kappa = pts.bc_kappa.to(b.dtype)[None, :, None]
        b_bc = (1 - kappa) * b_bc + kappa * b[:, pts.bc_j, pts.bc_inner]
        r_bc = torch.einsum("bmn,bn->bm", b_bc, omega) - pts.bc_value.to(b.dtype)
    return torch.cat([r_pde, r_ic, r_bc], 1), torch.cat([j_pde, b_ic, b_bc], 1), st, r_pde


def _cost_grad(r: Tensor, jac: Tensor, omega: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    cost = 0.5 * (r ** 2).sum(1) + 0.5 * ridge * (omega ** 2).sum(1)
    return cost, torch.einsum("bmn,bm->bn", jac, r) + ridge * omega


def _damped_solve(m0: Tensor, grad: Tensor, lam: Tensor, todo: Tensor, damping0: float,
                  scaling: Optional[Tensor] = None) -> tuple[Tensor, Tensor, int]:
    """δ = −(M0 + λ diag(D))⁻¹ ∇L for the samples in `todo`, by Cholesky, D = `scaling` [B, N] (default
    diag(M0)); a sample whose factorisation fails gets λ ← max(10λ, damping0) and is retried (a
    fallback). D is floored at 1e-12·max(1, max D) per sample so that even M0 = 0 (all-zero basis,
    ridge 0) becomes definite."""
    d = torch.diagonal(m0, dim1=1, dim2=2) if scaling is None else scaling
    floor = 1e-12 * d.amax(1, keepdim=True).clamp_min(1.0)
    d = torch.maximum(d, floor)
    delta, lam, fallbacks = torch.zeros_like(grad), lam.clone(), 0
    for _ in range(40):
        chol, info = torch.linalg.cholesky_ex(m0 + torch.diag_embed(lam.unsqueeze(1) * d))
        ok = todo & (info == 0)
        sol = torch.cholesky_solve(-grad.unsqueeze(-1), chol).squeeze(-1)
        delta = torch.where(ok.unsqueeze(1), sol, delta)  # failed samples' (garbage) solves are discarded
        todo = todo & ~ok
        if not bool(todo.any()):
            return delta, lam, fallbacks
        fallbacks += int(todo.sum())
        lam = torch.where(todo, torch.clamp_min(10.0 * lam, damping0), lam)
    raise ValueError(f"hard constraint: normal equations not factorisable for samples {todo.nonzero().flatten().tolist()} "
                     "even with damping raised 40 times (basis values too large?)")


def _model_matrices(jac: Tensor, st: Stencil, r_pde: Tensor, omega: Tensor, pde: "ConstraintRows",
                    opt: LMOptions) -> tuple[Tensor, Tensor]:
    """(JᵀJ + ridge I, the step's model matrix M): M is the first (Gauss–Newton) or H of (2) (exact)."""
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
    gn = jac.transpose(1, 2) @ jac + opt.ridge * eye
    return gn, gn if opt.hessian == "gauss_newton" else gn + pde.hessian_term(st, omega, r_pde)


def _lm_solve(b: Tensor, u0: Tensor, pts: ConstraintPoints, pde: ConstraintRows, opt: LMOptions) -> tuple[Tensor, HardConstraintInfo]:
    """Batched LM with per-sample damping and convergence mask: a sample's arithmetic only ever involves
    its own rows, and a converged sample is frozen, so its result does not depend on its batch mates."""
    bsz, n = b.shape[0], b.shape[-1]
    eye = torch.eye(n, dtype=b.dtype, device=b.device)
    zeros = torch.zeros(bsz, n, dtype=b.dtype, device=b.device)
    # Start: the problem linearised at u = 0, i.e. an undamped Gauss–Newton step from ω = 0 (J(0) = Lin).
    r, jac, _, _ = _rows(b, u0, pts, pde, zeros)
    _, grad0 = _cost_grad(r, jac, zeros, opt.ridge)
    thresh = opt.tol * grad0.abs().amax(1).clamp_min(1.0)
    all_on = torch.ones(bsz, dtype=torch.bool, device=b.device)
    delta, _, fallbacks = _damped_solve(jac.transpose(1, 2) @ jac + opt.ridge * eye, grad0, zeros[:, 0], all_on, opt.damping0)
    omega = delta
    lam = torch.full((bsz,), opt.damping0, dtype=b.dtype, device=b.device)
    iters = torch.zeros(bsz, dtype=torch.long, device=b.device)
    stalled = torch.zeros(bsz, dtype=torch.bool, device=b.device)
    nu = torch.full((bsz,), 2.0, dtype=b.dtype, device=b.device)
    r, jac, st, r_pde = _rows(b, u0, pts, pde, omega)
    cost, grad = _cost_grad(r, jac, omega, opt.ridge)
    gn, model = _model_matrices(jac, st, r_pde, omega, pde, opt)
    for _ in range(opt.max_iter):
        active = (grad.abs().amax(1) > thresh) & ~stalled  # per-sample mask: stopped samples are frozen
        if not bool(active.any()):
            break
        scaling, step = torch.diagonal(gn, dim1=1, dim2=2), gn
        if opt.hessian == "exact":  # Newton where H + λD is definite, Gauss–Newton where it is not
            definite = torch.linalg.cholesky_ex(model + torch.diag_embed(lam.unsqueeze(1) * scaling))[1] == 0
            step = torch.where(definite[:, None, None], model, gn)
        delta, lam, fb = _damped_solve(step, grad, lam, active, opt.damping0, scaling)
        fallbacks += fb
        trial = omega + delta
        r_t, jac_t, st_t, r_pde_t = _rows(b, u0, pts, pde, trial)
        cost_t, grad_t = _cost_grad(r_t, jac_t, trial, opt.ridge)
        # Accept a cost decrease. Near the optimum the decrease (~‖∇L‖²/H) drops below the rounding of
        # L itself, so there a step whose cost is equal within roundoff is accepted if it shrinks ‖∇L‖∞;
        # otherwise the last digits would be decided by noise and λ would grow until the solver stalls.
        noise = 16.0 * torch.finfo(b.dtype).eps * cost.abs().clamp_min(torch.finfo(b.dtype).tiny)
        tie = ((cost_t - cost).abs() <= noise) & (grad_t.abs().amax(1) < grad.abs().amax(1))
        accept = active & ((cost_t < cost) | tie)
        # Stalled: the step failed although the model promised at most a relative decrease of ftol,
        # −∇Lᵀδ − ½ δᵀMδ <= ftol·L: what is left is rounding or a kink.
        predicted = -(grad * delta).sum(1) - 0.5 * torch.einsum("bn,bnk,bk->b", delta, step, delta)
        stalled = stalled | (active & ~accept & (predicted <= opt.ftol * cost.abs()))
        rho = (cost - cost_t) / predicted.clamp_min(torch.finfo(b.dtype).tiny)  # gain ratio, before L moves on
        shrink = torch.clamp_min(1.0 - (2.0 * rho - 1.0) ** 3, 1.0 / 3.0)
        omega = torch.where(accept.unsqueeze(1), trial, omega)
        if bool(accept.any()):  # a rejected trial's matrices are never used
            gn_t, model_t = _model_matrices(jac_t, st_t, r_pde_t, trial, pde, opt)
            gn = torch.where(accept[:, None, None], gn_t, gn)
            model = gn if opt.hessian == "gauss_newton" else torch.where(accept[:, None, None], model_t, model)
        cost, grad = torch.where(accept, cost_t, cost), torch.where(accept.unsqueeze(1), grad_t, grad)
        # Nielsen's damping update (Madsen, Nielsen & Tingleff, Methods for Non-Linear Least Squares
        # Problems, 2004, §3.2): after a success λ ← λ·max(1/3, 1 − (2ρ − 1)³), ρ = actual / predicted
        # decrease; after a failure λ ← λ·ν with ν doubling per failure in a row, so a sample whose
        # model is poor (an indefinite region) reaches a trusted step in a few tries, not dozens.
        lam = torch.where(accept, lam * shrink, torch.where(active, lam * nu, lam))
        nu = torch.where(accept, torch.full_like(nu, 2.0), torch.where(active, nu * 2.0, nu))
        iters = iters + active.long()
    if not bool(torch.isfinite(omega).all()):  # cannot happen for finite inputs short of overflow; never return NaN
        raise ValueError("hard constraint: solver produced non-finite ω (overflow; basis values too large?)")
    gnorm = grad.abs().amax(1)
    info = HardConstraintInfo(iterations=int(iters.max()) if bsz else 0, mean_iterations=float(iters.double().mean()) if bsz else 0.0,
                              grad_norm=float(gnorm.max()) if bsz else 0.0, cost=float(cost.mean()) if bsz else 0.0,
                              fallbacks=fallbacks, unconverged=int(((gnorm > thresh) & ~stalled).sum()),
                              stalled=int(((gnorm > thresh) & stalled).sum()))
    return omega, info


def full_hessian(b: Tensor, u0: Tensor, pts: ConstraintPoints, pde: ConstraintRows, omega: Tensor, ridge: float) -> Tensor:
    """H of (2) at ω: JᵀJ + ridge I + Σ_pde rows r_row ∇²r_row (IC/BC rows are linear: no second-order term)."""
    _, jac, st, r_pde = _rows(b, u0, pts, pde, omega)
    return _model_matrices(jac, st, r_pde, omega, pde, LMOptions(ridge=ridge, hessian="exact"))[1]


class _HardConstraintFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, b_block: Tensor, u0: Tensor, pts: ConstraintPoints, pde: ConstraintRows, opt: LMOptions, sink: list) -> Tensor:
        b64 = b_block.detach().to(torch.float64)
        omega, info = _lm_solve(b64, u0, pts, pde, opt)
        sink.append(info)
        ctx.save_for_backward(b_block, u0, omega)
        ctx.pts, ctx.pde, ctx.opt = pts, pde, opt
        return omega

    @staticmethod
    @once_differentiable
    def backward(ctx, v: Tensor):
        b_block, u0, omega = ctx.saved_tensors
        pts, pde, ridge = ctx.pts, ctx.pde, ctx.opt.ridge
        b64 = b_block.detach().to(torch.float64)
        h = full_hessian(b64, u0, pts, pde, omega, ridge)
        rhs = v.to(torch.float64).unsqueeze(-1)
        chol, info = torch.linalg.cholesky_ex(h)
        mu = torch.cholesky_solve(rhs, chol)
        bad = info != 0
        if bool(bad.any()):  # H indefinite (second-order term) or singular: LU for those samples
            mu_lu, info_lu = torch.linalg.solve_ex(h[bad], rhs[bad])
            if bool((info_lu != 0).any()):
                raise ValueError("hard constraint backward: Hessian singular at the solution (no implicit gradient); "
                                 "use ridge > 0")
            mu[bad] = mu_lu
        # dLoss/db = −(∂g/∂b)ᵀ μ: a VJP through g(ω*, b) = Jᵀr + ridge ω*, with ω* held fixed.
        with torch.enable_grad():
            b_req = b64.detach().requires_grad_(True)
            r, jac, _, _ = _rows(b_req, u0, pts, pde, omega)
            g = torch.einsum("bmn,bm->bn", jac, r) + ridge * omega
            (gb,) = torch.autograd.grad(g, b_req, grad_outputs=-mu.squeeze(-1))
        return gb.to(b_block.dtype), None, None, None, None, None


def solve_hard_constraint(b_block: Tensor, u0_targets: Tensor, points: ConstraintPoints, pde: ConstraintRows,
                          options: LMOptions | None = None) -> tuple[Tensor, HardConstraintInfo]:
    """ω* [B, N] (float64) of (1) for b_block [B, Tb, Xb, N] (any float dtype; its gradient comes back
    in that dtype via the IFT (2)) and u0_targets [B, n_ic] (data, no gradient). Returns (ω*, info)."""
    options = options or LMOptions()
    if b_block.dim() != 4:
        raise ValueError(f"hard constraint: b_block must be [B, Tb, Xb, N], got {tuple(b_block.shape)}")
    bsz, tb, xb, _ = b_block.shape
    n_ic = points.ic_j.numel()
    if tuple(u0_targets.shape) != (bsz, n_ic):
        raise ValueError(f"hard constraint: u0_targets must be [B={bsz}, n_ic={n_ic}], got {tuple(u0_targets.shape)}")
    points.validate(tb, xb)
    if not bool(torch.isfinite(b_block).all()):
        raise ValueError(f"hard constraint: non-finite basis values in b_block "
                         f"({int((~torch.isfinite(b_block)).sum())} of {b_block.numel()} entries are NaN/inf)")
    if not bool(torch.isfinite(u0_targets).all()):
        raise ValueError("hard constraint: non-finite initial-condition targets in u0_targets")
    u0 = u0_targets.detach().to(torch.float64)
    dev = b_block.device
    points = points.to(dev)
    sink: list[HardConstraintInfo] = []
    omega = _HardConstraintFn.apply(b_block, u0, points, pde, options, sink)
    return omega, sink[0]

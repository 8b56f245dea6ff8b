"""The single-process optimizers of dist_train/optim/ against their formulas, re-derived here.

Source of the formulas: Keller Jordan's Muon write-up (2024: Newton–Schulz, Muon), the Polar Express
paper (Amsel et al., arXiv 2505.16932, Algorithm 1) and the NorMuon paper (Li et al., arXiv 2510.05491).
Every reference below is written with plain torch ops in float64 and never calls the library's own
helpers (not `newton_schulz`, not its coefficient tables, not `muon_scale`): a shared bug cannot
cancel out. The Polar Express table is copied again from the paper.

What is checked, one section per formula:
1. Newton–Schulz (quintic and Polar Express): an explicit loop; batched == per matrix; the
   properties (quintic singular values in [0.5, 1.5], Polar Express at 10 steps within 1e-3 of the
   exact polar factor U·Vᵀ); the `dtype` option; the FLOP count.
2. Muon: 3 steps against the rule (Nesterov on/off, both lr scales), with a wide, a tall and a conv
   matrix (orthogonalised as its (out, in·kh·kw) flattening).
3. NorMuon: 3 steps of the paper rule and of the authors' reference variant.
4. The AdamW param groups == torch.optim.AdamW.
5. clip_grad_norm == the global L2 norm and torch.nn.utils.clip_grad_norm_.
6. The errors (1-D matrix parameter, bad lr_scale / variant / NS coefficient names).
7. Use as an ordinary torch optimizer: a least-squares fit, and a state_dict round trip.

Tolerances, and why they are tight enough to mean something:
- NS vs the explicit loop: rtol 1e-12 (atol 1e-14). Same operations in float64; the iteration is a
  fixed smooth polynomial map, so rounding differences stay ~1e-15. A wrong coefficient (even in the
  4th digit), normalisation or safety factor moves entries by far more.
  Note: working on Gᵀ for a tall G changes only the cost, not the result ((X·Xᵀ)·X = X·(Xᵀ·X)), so
  the tall cases check the result, not which orientation the code multiplies in.
- Muon / NorMuon vs the reference: rtol 1e-10 (atol 1e-14) on weights, updates and every state
  tensor after each of 3 steps, the same bound as the distributed tests.
- AdamW: rtol 1e-12 — the same arithmetic as torch's, so anything but rounding is a bug.
- dtype option: float32 in, float64 compute: within one float32 ulp of the float64 result, which
  a float32 computation misses by ~10× (checked in the test itself).
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from dist_train.optim import Muon, NorMuon, newton_schulz
from dist_train.optim.newton_schulz import ns_flops

DT = torch.float64
NS_RTOL, NS_ATOL = 1e-12, 1e-14
OPT_RTOL, OPT_ATOL = 1e-10, 1e-14
ADAMW_RTOL, ADAMW_ATOL = 1e-12, 1e-15


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=DT)


# =====================================================================================================
# The reference Newton–Schulz (written out again; never the library's)
# =====================================================================================================

# Keller Jordan's quintic coefficients (his Muon write-up, 2024).
QUINTIC_ABC = (3.4445, -4.7750, 2.0315)

# Polar Express, arXiv 2505.16932, Algorithm 1: the per-step (a, b, c) before the safety factor.
PAPER_POLAR_EXPRESS = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]
SAFETY = 1.01


def polar_express_table() -> list[tuple[float, float, float]]:
    """Algorithm 1: every triple but the last becomes (a/1.01, b/1.01³, c/1.01⁵)."""
    safe = [(a / SAFETY, b / SAFETY ** 3, c / SAFETY ** 5) for a, b, c in PAPER_POLAR_EXPRESS[:-1]]
    return safe + [PAPER_POLAR_EXPRESS[-1]]


def ref_ns(G: torch.Tensor, steps: int = 5, coefficients: str = "quintic") -> torch.Tensor:
    """One m×n matrix, float64, a plain loop:
    X ← G/(s·‖G‖_F + 1e-7) (on Gᵀ if m > n), s = 1 (quintic) or 1.01 (Polar Express);
    `steps` × {A = X Xᵀ; B = b·A + c·A²; X = a·X + B·X}; transposed back. Polar Express steps
    beyond the table reuse its last triple."""
    assert G.ndim == 2
    X = G.to(DT).clone()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    fro = torch.sqrt((X * X).sum())
    if coefficients == "quintic":
        table, s = [QUINTIC_ABC], 1.0
    else:
        table, s = polar_express_table(), SAFETY
    X = X / (s * fro + 1e-7)
    for k in range(steps):
        a, b, c = table[min(k, len(table) - 1)]
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.T if tall else X


# =====================================================================================================
# 1. Newton–Schulz
# =====================================================================================================

@pytest.mark.parametrize("coefficients,steps", [("quintic", 5), ("quintic", 3), ("polar_express", 5),
                                                ("polar_express", 8), ("polar_express", 11)])
@pytest.mark.parametrize("shape", [(6, 11), (13, 5)], ids=["wide", "tall"])
def test_ns_matches_explicit_loop(shape, coefficients, steps):
    """newton_schulz(G, steps, coefficients) == the explicit loop (Jordan's NS; Polar Express
    Algorithm 1 with the 1.01 safety factor, 11 steps reusing the last triple), rtol 1e-12."""
    G = randn(*shape, seed=1, scale=3.0)
    got = newton_schulz(G, steps, coefficients)
    assert got.shape == G.shape and got.dtype == DT
    torch.testing.assert_close(got, ref_ns(G, steps, coefficients), rtol=NS_RTOL, atol=NS_ATOL)


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
@pytest.mark.parametrize("shape", [(5, 9), (9, 5)], ids=["wide", "tall"])
def test_ns_batched_equals_per_matrix(shape, coefficients):
    """A [k, m, n] batch is k independent NS calls: each matrix normalised by its own Frobenius norm
    (scales 1e-3, 1 and 1e3 would give very different results under one shared norm)."""
    batch = torch.stack([randn(*shape, seed=10 + i, scale=s) for i, s in enumerate([1e-3, 1.0, 1e3])])
    got = newton_schulz(batch, 5, coefficients)
    assert got.shape == batch.shape
    for i in range(batch.shape[0]):
        torch.testing.assert_close(got[i], newton_schulz(batch[i], 5, coefficients), rtol=NS_RTOL, atol=NS_ATOL)
        torch.testing.assert_close(got[i], ref_ns(batch[i], 5, coefficients), rtol=NS_RTOL, atol=NS_ATOL)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
def test_quintic_is_U_Sprime_Vt_with_Sprime_in_half_to_three_halves(shape):
    """Jordan's quintic NS: NS(G) ≈ U·S'·Vᵀ with S' roughly in [0.5, 1.5] (G = U·S·Vᵀ): Uᵀ·NS(G)·V is
    diagonal (same singular vectors) and its diagonal lies in [0.5, 1.5]."""
    G = randn(*shape, seed=2)
    O = newton_schulz(G, 5, "quintic")
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.T @ O @ Vh.T
    diag = torch.diagonal(D)
    assert (D - torch.diag(diag)).abs().max() < 1e-10
    assert diag.min() >= 0.5 and diag.max() <= 1.5, diag
    sv = torch.linalg.svdvals(O)
    assert sv.min() >= 0.5 and sv.max() <= 1.5, sv


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)], ids=["wide", "tall", "square"])
def test_polar_express_10_steps_reaches_the_polar_factor(shape):
    """Polar Express with 10 steps: singular values within 1e-3 of 1 and the result within 1e-3 of
    the exact polar factor U·Vᵀ (torch.linalg.svd). The bound discriminates: 5 quintic steps miss it."""
    G = randn(*shape, seed=3)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh
    O = newton_schulz(G, 10, "polar_express")
    assert (torch.linalg.svdvals(O) - 1).abs().max() < 1e-3
    assert (O - polar).abs().max() < 1e-3
    quintic = newton_schulz(G, 5, "quintic")
    assert (torch.linalg.svdvals(quintic) - 1).abs().max() > 1e-2


def test_ns_dtype_option_computes_in_float64_returns_input_dtype():
    """dtype=float64 on a float32 input: computed in float64 (within one float32 ulp of the float64
    reference) and returned as float32. A float32 computation is >10× further off."""
    G32 = randn(24, 40, seed=4).float()
    ref = ref_ns(G32.double(), 5, "quintic")
    got = newton_schulz(G32, 5, "quintic", dtype=torch.float64)
    assert got.dtype == torch.float32 and got.shape == G32.shape
    ulp = 2.0 ** -23
    torch.testing.assert_close(got.double(), ref, rtol=ulp, atol=1e-12)
    in_fp32 = newton_schulz(G32, 5, "quintic")
    assert (in_fp32.double() - ref).abs().max() > 10 * (got.double() - ref).abs().max()


@pytest.mark.parametrize("m,n,steps", [(3, 7, 5), (7, 3, 5), (16, 16, 1), (64, 256, 8), (256, 64, 8)])
def test_ns_flops(m, n, steps):
    """NS cost per iteration 4·m²·n + 2·m³ with m = min(m, n) ≤ n = max(m, n)."""
    lo, hi = min(m, n), max(m, n)
    assert ns_flops(m, n, steps) == steps * (4 * lo * lo * hi + 2 * lo ** 3)


def test_ns_flops_worked_example():
    # 3×7 (or 7×3), 5 steps: 5·(4·9·7 + 2·27) = 5·306
    assert ns_flops(3, 7, 5) == ns_flops(7, 3, 5) == 1530


# =====================================================================================================
# Shared fixtures for sections 2–7: parameters, gradients, a stepping loop
# =====================================================================================================

MATRIX_SHAPES = {"wide": (6, 10), "tall": (12, 5), "conv": (4, 3, 3, 3)}  # conv -> (4, 27)
ADAMW_SHAPES = {"bias": (7,), "emb": (9, 4)}
STEPS = 3


def make_params(shapes: dict, seed: int) -> dict:
    return {k: torch.nn.Parameter(randn(*s, seed=seed + i)) for i, (k, s) in enumerate(shapes.items())}


def grads_at(shapes: dict, step: int) -> dict:
    """A different gradient at every step (not a scaled copy of the previous one)."""
    return {k: randn(*s, seed=1000 * (step + 1) + i, scale=1.0 + 0.5 * step) for i, (k, s) in enumerate(shapes.items())}


def mn(shape) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def run_steps(opt, params: dict, shapes: dict, steps: int = STEPS):
    """Steps `opt` on the gradients of grads_at; yields (step, weights after) each step."""
    for t in range(steps):
        g = grads_at(shapes, t)
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step()
        yield t, {k: p.detach().clone() for k, p in params.items()}


# =====================================================================================================
# 2. Muon
# =====================================================================================================

def ref_muon_scale(kind: str, m: int, n: int) -> float:
    """keller: √max(1, m/n); match_rms_adamw: 0.2·√max(m, n)."""
    return math.sqrt(max(1.0, m / n)) if kind == "keller" else 0.2 * math.sqrt(max(m, n))


class RefMuon:
    """M ← μ·M + G; U = G + μ·M (Nesterov) or M; O = NS(U); W ← W·(1 − lr·wd) − lr·s·O,
    on the (out, in·kh·kw) flattening of each weight."""

    def __init__(self, weights: dict, lr, momentum, nesterov, weight_decay, lr_scale, ns_steps, ns_coefficients):
        self.W = {k: w.detach().clone().reshape(mn(w.shape)) for k, w in weights.items()}
        self.shape = {k: w.shape for k, w in weights.items()}
        self.M = {k: torch.zeros_like(w) for k, w in self.W.items()}
        self.h = dict(lr=lr, mu=momentum, nesterov=nesterov, wd=weight_decay, scale=lr_scale,
                      steps=ns_steps, coeffs=ns_coefficients)

    def step(self, grads: dict):
        h = self.h
        for k in self.W:
            m, n = self.W[k].shape
            G = grads[k].reshape(m, n)
            self.M[k] = h["mu"] * self.M[k] + G
            U = G + h["mu"] * self.M[k] if h["nesterov"] else self.M[k]
            O = ref_ns(U, h["steps"], h["coeffs"])
            self.W[k] = self.W[k] * (1 - h["lr"] * h["wd"]) - h["lr"] * ref_muon_scale(h["scale"], m, n) * O

    def weight(self, k):
        return self.W[k].reshape(self.shape[k])


MUON_CASES = [
    dict(nesterov=True, lr_scale="keller", ns_coefficients="quintic", ns_steps=5),
    dict(nesterov=False, lr_scale="keller", ns_coefficients="quintic", ns_steps=5),
    dict(nesterov=True, lr_scale="match_rms_adamw", ns_coefficients="quintic", ns_steps=5),
    dict(nesterov=False, lr_scale="match_rms_adamw", ns_coefficients="polar_express", ns_steps=7),
]


def assert_steps_match(opt, ref, mats: dict, others: dict, row_state: bool = False) -> None:
    """Step `opt` and the independent reference `ref` together; after each step compare every matrix's
    weight, its update alone (W's magnitude must not hide an error in the step) and its momentum
    (and NorMuon's per-row v) at OPT_RTOL."""
    params = {**mats, **others}
    shapes = {**MATRIX_SHAPES, **ADAMW_SHAPES}
    before = {k: p.detach().clone() for k, p in mats.items()}
    for t, after in run_steps(opt, params, shapes):
        ref.step(grads_at(shapes, t))
        for k in mats:
            where = f"step {t + 1}, {k}"
            torch.testing.assert_close(after[k], ref.weight(k), rtol=OPT_RTOL, atol=OPT_ATOL, msg=where)
            torch.testing.assert_close(after[k] - before[k], ref.weight(k) - before[k], rtol=1e-9, atol=OPT_ATOL,
                                       msg=where)
            st = opt.state[mats[k]]
            torch.testing.assert_close(st["momentum_buffer"].reshape(ref.M[k].shape), ref.M[k], rtol=OPT_RTOL,
                                       atol=OPT_ATOL, msg=where)
            if row_state:
                torch.testing.assert_close(st["v"], ref.v[k], rtol=OPT_RTOL, atol=OPT_ATOL, msg=where)
            before[k] = after[k]


@pytest.mark.parametrize("case", MUON_CASES, ids=lambda c: f"nesterov={c['nesterov']}-{c['lr_scale']}-{c['ns_coefficients']}")
def test_muon_three_steps_match_rule(case):
    """Muon (Jordan, 2024) on a wide, a tall (m > n) and a conv weight (4,3,3,3) -> (4, 27), with an
    AdamW group alongside, over 3 steps: weights, each step's update and the momentum buffer == the
    reference at rtol 1e-10."""
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=0.1, **case)
    mats, others = make_params(MATRIX_SHAPES, seed=20), make_params(ADAMW_SHAPES, seed=30)
    ref = RefMuon(mats, **hyper)
    opt = Muon([{"params": list(mats.values())}, {"params": list(others.values()), "algorithm": "adamw"}], **hyper)
    assert_steps_match(opt, ref, mats, others)


def test_muon_conv_and_tall_first_step_geometry():
    """First step, Nesterov off, wd 0: the conv update reshaped to (out, in·kh·kw) has the singular
    values lr·s·S' of NS of that flattening (s = 1, out < in·kh·kw), and the tall update's scale is
    √(m/n) (s·O with O ≈ semi-orthogonal). With Polar Express at 10 steps S' = 1 to 1e-3, so the
    update's singular values are lr·s to 1e-3 relative — a (out·in, kh·kw) flattening gives rank ≤ 9
    and fails."""
    lr = 0.1
    mats = make_params(MATRIX_SHAPES, seed=40)
    before = {k: p.detach().clone() for k, p in mats.items()}
    opt = Muon(list(mats.values()), lr=lr, momentum=0.9, nesterov=False, ns_steps=10,
               ns_coefficients="polar_express")
    for k, p in mats.items():
        p.grad = grads_at(MATRIX_SHAPES, 0)[k].clone()
    opt.step()
    for k, p in mats.items():
        m, n = mn(p.shape)
        delta = (p.detach() - before[k]).reshape(m, n)
        sv = torch.linalg.svdvals(delta)
        assert sv.numel() == min(m, n)
        expected = lr * math.sqrt(max(1.0, m / n))
        assert (sv / expected - 1).abs().max() < 1e-3, (k, sv / expected)


# =====================================================================================================
# 3. NorMuon
# =====================================================================================================

class RefNorMuon:
    """paper (default):  M ← β1·M + (1−β1)·G; O = NS(M);
                          v ← β2·v + (1−β2)·mean_cols(O²); Ô = O/(√v + ε);
                          η̂ = 0.2·η·√(m·n)/‖Ô‖_F; W ← W − η·λ·W − η̂·Ô
    reference:            M as above; U = (1−β1)·G + β1·M (Nesterov, on by default); O = NS(U);
                          v, Ô as above; W ← W·(1 − ηλ) − η·(‖O‖_F/‖Ô‖_F)·√max(1, m/n)·Ô
    `nesterov` overrides the variant's default choice of U (M or (1−β1)·G + β1·M)."""

    def __init__(self, weights: dict, lr, betas, eps, weight_decay, variant, nesterov):
        self.W = {k: w.detach().clone().reshape(mn(w.shape)) for k, w in weights.items()}
        self.shape = {k: w.shape for k, w in weights.items()}
        self.M = {k: torch.zeros_like(w) for k, w in self.W.items()}
        self.v = {k: torch.zeros(w.shape[0], dtype=DT) for k, w in self.W.items()}
        self.h = dict(lr=lr, b1=betas[0], b2=betas[1], eps=eps, wd=weight_decay, variant=variant, nesterov=nesterov)

    def step(self, grads: dict):
        h = self.h
        lr, b1, b2 = h["lr"], h["b1"], h["b2"]
        for k in self.W:
            m, n = self.W[k].shape
            G = grads[k].reshape(m, n)
            self.M[k] = b1 * self.M[k] + (1 - b1) * G
            U = (1 - b1) * G + b1 * self.M[k] if h["nesterov"] else self.M[k]
            O = ref_ns(U, 5, "quintic")
            self.v[k] = b2 * self.v[k] + (1 - b2) * (O * O).sum(dim=1) / n
            O_hat = O / (torch.sqrt(self.v[k]) + h["eps"])[:, None]
            fro_hat = torch.sqrt((O_hat * O_hat).sum())
            if h["variant"] == "paper":
                eta_hat = 0.2 * lr * math.sqrt(m * n) / fro_hat
                self.W[k] = self.W[k] - lr * h["wd"] * self.W[k] - eta_hat * O_hat
            else:
                fro = torch.sqrt((O * O).sum())
                self.W[k] = self.W[k] * (1 - lr * h["wd"]) - lr * (fro / fro_hat) * math.sqrt(max(1.0, m / n)) * O_hat

    def weight(self, k):
        return self.W[k].reshape(self.shape[k])


NORMUON_CASES = [  # (variant, nesterov passed to NorMuon, nesterov the rule uses)
    ("paper", None, False),  # the paper rule, the default
    ("reference", None, True),  # the authors' code: Nesterov on by default
    ("paper", True, True),
    ("reference", False, False),
]


@pytest.mark.parametrize("variant,nesterov_arg,nesterov", NORMUON_CASES,
                         ids=[f"{v}-nesterov={a}" for v, a, _ in NORMUON_CASES])
def test_normuon_three_steps_match_rule(variant, nesterov_arg, nesterov):
    """NorMuon (Li et al., arXiv 2510.05491) over 3 steps on a wide, a tall and a conv weight
    with an AdamW group alongside: weights, updates, the momentum M and the per-row v == the
    reference at rtol 1e-10. Non-default betas so that each is read from the right place."""
    hyper = dict(lr=0.05, betas=(0.9, 0.8), eps=1e-8, weight_decay=0.1)
    kwargs = dict(hyper, variant=variant) if variant != "paper" else dict(hyper)  # paper: the default
    if nesterov_arg is not None:
        kwargs["nesterov"] = nesterov_arg
    mats, others = make_params(MATRIX_SHAPES, seed=50), make_params(ADAMW_SHAPES, seed=60)
    ref = RefNorMuon(mats, variant=variant, nesterov=nesterov, **hyper)
    opt = NorMuon([{"params": list(mats.values())}, {"params": list(others.values()), "algorithm": "adamw"}], **kwargs)
    assert_steps_match(opt, ref, mats, others, row_state=True)


def test_normuon_paper_update_rms_is_0_2_lr():
    """Paper rule with wd = 0: the update −η̂·Ô has RMS exactly 0.2·η (‖η̂·Ô‖_F = 0.2·η·√(m·n))."""
    lr = 0.03
    mats = make_params(MATRIX_SHAPES, seed=70)
    opt = NorMuon(list(mats.values()), lr=lr)
    for t, after in run_steps(opt, mats, MATRIX_SHAPES, steps=2):
        pass
    before = {k: p.detach().clone() for k, p in mats.items()}
    for k, p in mats.items():
        p.grad = grads_at(MATRIX_SHAPES, 5)[k].clone()
    opt.step()
    for k, p in mats.items():
        delta = p.detach() - before[k]
        rms = torch.sqrt((delta * delta).mean())
        assert abs(float(rms) / (0.2 * lr) - 1) < 1e-10, (k, float(rms))


# =====================================================================================================
# 4. The AdamW param groups == torch.optim.AdamW
# =====================================================================================================

ADAMW_HYPER = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)


def muon_with_adamw(mats, others):
    return Muon([{"params": mats}, {"params": others, "algorithm": "adamw", **ADAMW_HYPER}], lr=0.02)


def muon_with_adamw_defaults(mats, others):
    """The AdamW group takes betas/eps from Muon's own keyword arguments."""
    h = ADAMW_HYPER
    return Muon([{"params": mats}, {"params": others, "algorithm": "adamw", "lr": h["lr"],
                                    "weight_decay": h["weight_decay"]}],
                lr=0.02, betas=h["betas"], eps=h["eps"])


def normuon_with_adamw(mats, others):
    """NorMuon's AdamW groups take betas/eps from adamw_betas/adamw_eps, not from its (β1, β2)."""
    h = ADAMW_HYPER
    return NorMuon([{"params": mats}, {"params": others, "algorithm": "adamw", "lr": h["lr"],
                                       "weight_decay": h["weight_decay"]}],
                   lr=0.02, betas=(0.5, 0.5), eps=1e-3, adamw_betas=h["betas"], adamw_eps=h["eps"])


@pytest.mark.parametrize("factory", [muon_with_adamw, muon_with_adamw_defaults, normuon_with_adamw],
                         ids=lambda f: f.__name__)
def test_adamw_groups_match_torch_adamw(factory):
    """The algorithm="adamw" groups == torch.optim.AdamW(lr, betas, eps, weight_decay) over 3 steps
    (weights and exp_avg / exp_avg_sq), rtol 1e-12; the matrix group beside them is stepped too."""
    mats, others = make_params(MATRIX_SHAPES, seed=80), make_params(ADAMW_SHAPES, seed=90)
    twins = {k: torch.nn.Parameter(p.detach().clone()) for k, p in others.items()}
    opt = factory(list(mats.values()), list(others.values()))
    torch_opt = torch.optim.AdamW(list(twins.values()), **ADAMW_HYPER)
    params = {**mats, **others}
    shapes = {**MATRIX_SHAPES, **ADAMW_SHAPES}
    start = {k: p.detach().clone() for k, p in others.items()}
    for t, after in run_steps(opt, params, shapes):
        g = grads_at(shapes, t)
        for k, p in twins.items():
            p.grad = g[k].clone()
        torch_opt.step()
        for k, p in twins.items():
            where = f"step {t + 1}, {k}"
            torch.testing.assert_close(after[k], p.detach(), rtol=ADAMW_RTOL, atol=ADAMW_ATOL, msg=where)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[others[k]][key], torch_opt.state[p][key], rtol=ADAMW_RTOL,
                                           atol=ADAMW_ATOL, msg=f"{where} {key}")
    # the comparison is not between two untouched copies
    assert all((others[k].detach() - start[k]).abs().max() > 1e-4 for k in others)


# =====================================================================================================
# 5. clip_grad_norm
# =====================================================================================================

@pytest.mark.parametrize("max_norm", [1.0, 1e6], ids=["clips", "no-op"])
def test_clip_grad_norm_matches_formula_and_torch(max_norm):
    """clip_grad_norm(max_norm) returns ‖(all gradients)‖₂ over matrix and AdamW parameters (those
    without a gradient skipped) and scales every gradient by max_norm/(norm + 1e-6) when that is < 1;
    == torch.nn.utils.clip_grad_norm_ on copies."""
    mats, others = make_params(MATRIX_SHAPES, seed=100), make_params(ADAMW_SHAPES, seed=110)
    no_grad = torch.nn.Parameter(randn(3, 3, seed=120))
    opt = Muon([{"params": [*mats.values(), no_grad]}, {"params": list(others.values()), "algorithm": "adamw"}])
    params = {**mats, **others}
    g = grads_at({**MATRIX_SHAPES, **ADAMW_SHAPES}, 0)
    for k, p in params.items():
        p.grad = g[k].clone()
    copies = {k: torch.nn.Parameter(p.detach().clone()) for k, p in params.items()}
    for k, p in copies.items():
        p.grad = g[k].clone()

    formula = math.sqrt(sum(float((gk * gk).sum()) for gk in g.values()))
    assert formula > 5.0  # so max_norm = 1 does clip
    norm = opt.clip_grad_norm(max_norm)
    torch_norm = torch.nn.utils.clip_grad_norm_(list(copies.values()), max_norm)
    assert norm == pytest.approx(formula, rel=1e-12)
    assert norm == pytest.approx(float(torch_norm), rel=1e-12)
    coef = min(1.0, max_norm / (formula + 1e-6))
    for k, p in params.items():
        torch.testing.assert_close(p.grad, coef * g[k], rtol=1e-12, atol=0, msg=k)
        torch.testing.assert_close(p.grad, copies[k].grad, rtol=1e-12, atol=0, msg=k)
    assert no_grad.grad is None
    if max_norm < formula:
        total = math.sqrt(sum(float((p.grad * p.grad).sum()) for p in params.values()))
        assert total == pytest.approx(max_norm, rel=1e-5)


# =====================================================================================================
# 6. Errors
# =====================================================================================================

@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_1d_parameter_in_matrix_group_raises(cls):
    bias = torch.nn.Parameter(torch.zeros(5, dtype=DT))
    with pytest.raises(ValueError, match="1-D"):
        cls([torch.nn.Parameter(torch.zeros(4, 4, dtype=DT)), bias])
    cls([{"params": [torch.nn.Parameter(torch.zeros(4, 4, dtype=DT))]},
         {"params": [bias], "algorithm": "adamw"}])  # fine in an AdamW group


def test_bad_lr_scale_raises():
    with pytest.raises(ValueError, match="lr_scale"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4, dtype=DT))], lr_scale="bogus")


def test_bad_normuon_variant_raises():
    with pytest.raises(ValueError, match="variant"):
        NorMuon([torch.nn.Parameter(torch.zeros(4, 4, dtype=DT))], variant="bogus")


def test_bad_group_algorithm_raises():
    with pytest.raises(ValueError, match="algorithm"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(4, 4, dtype=DT))], "algorithm": "sgd"}])


def test_bad_ns_coefficients_raise():
    """newton_schulz rejects an unknown coefficient name; so does an optimizer built with one (at its
    first step at the latest: the name is not validated at construction)."""
    with pytest.raises(ValueError, match="coefficients"):
        newton_schulz(randn(4, 6, seed=0), 5, "bogus")
    for cls in (Muon, NorMuon):
        p = torch.nn.Parameter(randn(4, 6, seed=1))
        with pytest.raises(ValueError, match="coefficients"):
            opt = cls([p], ns_coefficients="bogus")
            p.grad = randn(4, 6, seed=2)
            opt.step()


def test_ns_rejects_vectors():
    with pytest.raises(ValueError):
        newton_schulz(randn(5, seed=0))


# =====================================================================================================
# 7. Use as an ordinary torch optimizer
# =====================================================================================================

def test_muon_fits_least_squares_with_model_parameters():
    """Muon(model.parameters()) on a bias-free 2-layer linear model fits Y = X·T: the loss falls
    below 5% of its start within 100 steps and step(closure) returns the closure's loss."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(16, 4, bias=False)).to(DT)
    X = randn(128, 8, seed=130)
    Y = X @ randn(8, 4, seed=131)
    opt = Muon(model.parameters(), lr=0.02)
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(X), Y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(100)]
    assert losses[-1] < 0.05 * losses[0], losses[::10]
    # torch's own schedulers drive it (they refuse anything but a torch.optim.Optimizer).
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(closure)
    schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def _mixed_optimizer(kind: str, mats: dict, others: dict):
    groups = [{"params": list(mats.values())}, {"params": list(others.values()), "algorithm": "adamw"}]
    if kind == "muon":
        return Muon(groups, lr=0.05, momentum=0.9, weight_decay=0.1)
    return NorMuon(groups, lr=0.05, weight_decay=0.1, variant=kind.split("-")[1])


@pytest.mark.parametrize("kind", ["muon", "normuon-paper", "normuon-reference"])
def test_state_dict_round_trip_gives_identical_next_step(kind):
    """2 steps, state_dict() through torch.save/torch.load, load_state_dict() into a fresh optimizer
    over copies of the weights: the 3rd step is identical (bitwise) on weights and every state.
    A fresh optimizer without the load steps differently, so the check is not vacuous."""
    shapes = {**MATRIX_SHAPES, **ADAMW_SHAPES}
    mats, others = make_params(MATRIX_SHAPES, seed=140), make_params(ADAMW_SHAPES, seed=150)
    opt = _mixed_optimizer(kind, mats, others)
    params = {**mats, **others}
    for _ in run_steps(opt, params, shapes, steps=2):
        pass
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    def clone_params():
        m = {k: torch.nn.Parameter(mats[k].detach().clone()) for k in mats}
        o = {k: torch.nn.Parameter(others[k].detach().clone()) for k in others}
        return m, o

    mats2, others2 = clone_params()
    opt2 = _mixed_optimizer(kind, mats2, others2)
    opt2.load_state_dict(saved)
    mats3, others3 = clone_params()
    opt3 = _mixed_optimizer(kind, mats3, others3)  # no load: must differ

    g = grads_at(shapes, 2)
    for o, ps in ((opt, params), (opt2, {**mats2, **others2}), (opt3, {**mats3, **others3})):
        for k, p in ps.items():
            p.grad = g[k].clone()
        o.step()
    params2, params3 = {**mats2, **others2}, {**mats3, **others3}
    for k in params:
        torch.testing.assert_close(params2[k], params[k], rtol=0, atol=0, msg=k)
        st, st2 = opt.state[params[k]], opt2.state[params2[k]]
        assert set(st) == set(st2), k
        for key in st:
            torch.testing.assert_close(st2[key], st[key], rtol=0, atol=0, msg=f"{k}.{key}")
    assert all((params3[k] - params[k]).abs().max() > 1e-6 for k in params)

"""DIFF2 (Murata & Suzuki, ICML 2023, arXiv 2302.03884) with the GD subroutine, over data-parallel ranks.

P workers (the ranks of `process_group`, or one process), worker p holding n_p examples; every round
uses each worker's full local data (no sampling). Round r = 0 ... R-1:
- restart (r mod T == 0): d_p = (1/n_p) sum_i clip_{C1}(grad l(x_r; z_i));
  v_r = (1/P) sum_p d_p + N(0, C1^2 sigma1^2 I)
- otherwise: C_{2,r} = C2 * ||x_r - x_{r-1}|| (depends on released iterates only);
  d_p = (1/n_p) sum_i clip_{C_{2,r}}(grad l(x_r; z_i) - grad l(x_{r-1}; z_i));
  v_r = v_{r-1} + (1/P) sum_p d_p + N(0, C_{2,r}^2 sigma2^2 I)
- x_{r+1} = x_r - lr * v_r.
T = 1 is exactly DP-GD. clip_C(u) = u * min(1, C / (||u|| + 1e-6)), flat over all parameters.

The "server" is one all-reduce (mean over workers); the Gaussian is drawn from a generator seeded by
(seed, round) identically on every rank, which equals one draw by a server. Per-example gradients are
instantiated with torch.func (vmap of grad): DIFF2 clips per-example gradient *differences* at two
iterates, which no ghost norm of one backward pass gives; this is meant for the small models of the
paper's experiments (a two-layer MLP on regression data). One pass per round: a difference round's
gradients at x_{r-1} are the previous round's (same full data), kept between rounds.

Noise: the authors' closed form (`closed_form_sigmas`), or `calibrated_sigmas`, which scales both
down by the factor an accountant allows at the same (epsilon, delta) (`diff2_epsilon` composes the
rounds as Gaussian mechanisms of sensitivity 2C/(nP)).

The trainer's `optim.name: diff2` wraps this class (`diff2_transform.py`); `dist-train bench
diff2` runs it directly on P gloo workers.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from dist_train.data.sampler import derive_seed

_TAG = 0x44494632


def closed_form_sigmas(epsilon: float, delta: float, n: int, workers: int, rounds: int, period: int,
                       u: float = 1.25) -> tuple[float, float]:
    """The authors' closed-form (sigma1, sigma2): alpha = int(1 + ceil(2 ln(1/delta) / epsilon));
    sigma1 = sqrt(c1 alpha R / (T n^2 P^2 epsilon)), c1 = 4u if T > 1 else 4;
    sigma2 = sqrt((4u / (u - 1)) alpha R / (n^2 P^2 epsilon)); n = the smallest worker's data size."""
    alpha = int(1 + math.ceil(2 * math.log(1 / delta) / epsilon))
    c1 = 4 * u if period > 1 else 4.0
    sigma1 = math.sqrt(c1 * alpha * rounds / (period * n ** 2 * workers ** 2 * epsilon))
    sigma2 = math.sqrt((4 * u / (u - 1)) * alpha * rounds / (n ** 2 * workers ** 2 * epsilon))
    return sigma1, sigma2


def diff2_noise_multipliers(sigma1: float, sigma2: float, n: int, workers: int) -> tuple[float, float]:
    """Each release's noise std over its sensitivity. Replacing one example of worker p moves the
    server's mean (1/P) sum_p d_p by at most 2 C / (n P) (C = C1, or C_{2,r} in a difference round)
    while the noise std is C sigma: z = sigma n P / 2 in both kinds of round (n = the smallest n_p)."""
    return sigma1 * n * workers / 2, sigma2 * n * workers / 2


def diff2_epsilon(sigma1: float, sigma2: float, n: int, workers: int, rounds: int, period: int, delta: float,
                  accountant: str = "rdp") -> float:
    """epsilon of R rounds of DIFF2 at (sigma1, sigma2): ceil(R/T) restarts and R - ceil(R/T) difference
    rounds, each a Gaussian mechanism on the full data (sampling rate 1), composed by the accountant
    (Opacus's RDP with the Balle et al. conversion, or PRV). With the closed-form sigmas the paper's
    own RDP bound gives exactly epsilon; a tight accountant gives less (2.54 at epsilon 3 for
    the paper's setting: P = 10, n = 1651, R = 2000, delta = 1e-5; tests/test_diff2.py checks it)."""
    from dist_train.privacy.accounting import _check_accountant, _check_delta, _history_epsilon

    z1, z2 = diff2_noise_multipliers(sigma1, sigma2, n, workers)
    restarts = math.ceil(rounds / period)
    history = ((z1, 1.0, restarts), (z2, 1.0, rounds - restarts))
    return _history_epsilon(history, _check_delta(delta), _check_accountant(accountant))


def calibrated_sigmas(epsilon: float, delta: float, n: int, workers: int, rounds: int, period: int,
                      accountant: str = "rdp", u: float = 1.25) -> tuple[float, float]:
    """The closed-form (sigma1, sigma2) scaled down by one common factor k <= 1, the smallest (to 1e-4
    relative) whose accountant epsilon is still <= `epsilon`: the same guarantee with less noise.
    Safe side: bisection keeps the upper end, whose epsilon was verified."""
    s1, s2 = closed_form_sigmas(epsilon, delta, n, workers, rounds, period, u)

    def eps(k: float) -> float:
        return diff2_epsilon(k * s1, k * s2, n, workers, rounds, period, delta, accountant)

    hi = 1.0
    if eps(hi) > epsilon:  # cannot happen for RDP (the paper's bound is an RDP bound); PRV's error term might
        while eps(hi) > epsilon:
            hi *= 1.1
    lo = hi / 2
    while eps(lo) <= epsilon:
        hi, lo = lo, lo / 2
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        if eps(mid) <= epsilon:
            hi = mid
        else:
            lo = mid
    return hi * s1, hi * s2


def _clip_rows(u: torch.Tensor, radius: float) -> torch.Tensor:
    """Each row u_i scaled by min(1, radius / (||u_i|| + 1e-6))."""
    return u * (radius / (u.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)


class Diff2:
    """DIFF2-GD on `model`'s trainable parameters (DP-GD when `period` == 1)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], lr: float,
                 period: int, c1: float, c2: float, sigma1: float, sigma2: float, seed: int = 0,
                 process_group: Optional[dist.ProcessGroup] = None):
        if period < 1:
            raise ValueError("period T must be >= 1")
        self.model, self.loss_fn, self.lr, self.period = model, loss_fn, lr, period
        self.c1, self.c2, self.sigma1, self.sigma2, self.seed = c1, c2, sigma1, sigma2, seed
        self.group = process_group
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.prev: Optional[torch.Tensor] = None  # x_{r-1}, flat
        self.v: Optional[torch.Tensor] = None  # v_{r-1}
        # The last round's (x, y, per-example gradients at x_{r-1}). Every round uses the worker's whole
        # data, so a difference round's gradients at x_{r-1} are the previous round's at its iterate:
        # kept, they halve the per-example work, at the cost of holding an [n, d] tensor between rounds.
        self._last_grads: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def _flat(self) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def _per_example_grads(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[n, d] per-example gradients of the loss at parameters `flat`."""
        shapes = {n: p.shape for n, p in self.model.named_parameters() if n in self.names}
        sizes = [math.prod(s) for s in shapes.values()]
        params = {n: t.view(shapes[n]) for n, t in zip(self.names, torch.split(flat, sizes))}

        def loss(p, xi, yi):
            out = torch.func.functional_call(self.model, p, (xi.unsqueeze(0),))
            return self.loss_fn(out, yi.unsqueeze(0))

        grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
        return torch.cat([grads[n].reshape(x.size(0), -1) for n in self.names], dim=1)

    def _mean_over_workers(self, d: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return d
        dist.all_reduce(d, group=self.group)
        return d / dist.get_world_size(self.group)

    def _gaussian(self, like: torch.Tensor, round_: int) -> torch.Tensor:
        gen = torch.Generator(device=like.device)
        gen.manual_seed(derive_seed(self.seed, round_, _TAG))
        return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def direction(self, x: torch.Tensor, y: torch.Tensor, round_: int) -> tuple[torch.Tensor, dict]:
        """Round `round_` on this worker's whole local data (x, y): the released direction v_r (flat,
        identical on every worker) and the round's figures. The parameters are not changed."""
        cur = self._flat()
        with torch.enable_grad():
            g_now = self._per_example_grads(cur, x, y)
        restart = round_ % self.period == 0 or self.v is None
        if restart:
            radius, sigma = self.c1, self.sigma1
            d = _clip_rows(g_now, radius).mean(0)
            v = self._mean_over_workers(d) + radius * sigma * self._gaussian(d, round_)
        else:
            radius, sigma = self.c2 * float((cur - self.prev).norm()), self.sigma2
            g_prev = self._grads_at_prev(x, y)
            d = _clip_rows(g_now - g_prev, radius).mean(0)
            v = self.v + self._mean_over_workers(d) + radius * sigma * self._gaussian(d, round_)
        # Copies of the data, not references: a caller refilling one buffer in place must not look the same.
        self.prev, self.v, self._last_grads = cur, v, (x.detach().clone(), y.detach().clone(), g_now)
        return v, {"restart": restart, "radius": radius, "noise_std": radius * sigma, "v_norm": float(v.norm())}

    def _grads_at_prev(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example gradients at x_{r-1} on (x, y): the last round's if it saw the same data."""
        if self._last_grads is not None:
            last_x, last_y, grads = self._last_grads
            if (last_x.shape == x.shape and last_y.shape == y.shape and torch.equal(last_x, x)
                    and torch.equal(last_y, y)):
                return grads
        with torch.enable_grad():
            return self._per_example_grads(self.prev, x, y)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector over the trainable parameters as {name: tensor shaped like the parameter}."""
        params = dict(self.model.named_parameters())
        out, offset = {}, 0
        for n in self.names:
            p = params[n]
            out[n] = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return out

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor, round_: int) -> dict:
        """One round, GD subroutine: x_{r+1} = x_r - lr v_r; returns the round's figures."""
        v, figures = self.direction(x, y, round_)
        params = dict(self.model.named_parameters())
        for n, vn in self.unflatten(v).items():
            params[n].sub_(self.lr * vn)
        return figures

    def state_dict(self) -> dict:
        return {"prev": self.prev, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        self.prev, self.v = state["prev"], state["v"]
        self._last_grads = None  # recomputed at the restored x_{r-1} in the next difference round

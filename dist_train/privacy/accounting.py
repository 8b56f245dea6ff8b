"""Privacy accounting for DP-SGD with Poisson sampling, on top of Opacus's accountants.

Two accountants, both for the Poisson-subsampled Gaussian mechanism (σ = noise multiplier,
q = sample rate = train.batch_size / dataset size, one release per logical step):

- "rdp": Rényi DP (Mironov 2017; subsampled Gaussian by Mironov, Talwar & Zhang 2019) over
  Opacus's default orders `RDPAccountant.DEFAULT_ALPHAS`, converted to (ε, δ) with the
  Balle et al. 2020 conversion ("Hypothesis testing interpretations and Rényi differential
  privacy", Theorem 21), which is Opacus's default. Fast (~20 ms per distinct (σ, q)).
- "prv": numerical composition of privacy loss random variables (Gopi, Lee & Wutschitz 2021,
  arXiv 2106.02848) via Opacus's `PRVAccountant`. Tighter than RDP; ε is Opacus's *upper*
  bound `eps_estimate + eps_error` with eps_error = PRV_EPS_ERROR (0.01) and
  delta_error = δ/1000 (Opacus's defaults), so it can never report less than ~0.01.
  Slower (~0.3 s for a typical run) and its memory grows with the discretisation grid.

Nothing here implements an accountant: the numbers are Opacus's. Noise calibration searches σ
and returns it on the safe side: compute_epsilon(calibrate_noise(ε, ...), ...) <= ε always.

Opacus is imported lazily so `import dist_train.privacy` stays cheap (importing opacus takes
seconds).
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from numbers import Integral, Real
from typing import Any

from dist_train.errors import UserError

ACCOUNTANTS = ("rdp", "prv")
# Opacus PRVAccountant.get_epsilon defaults; ε returned is the upper end of its error band.
PRV_EPS_ERROR = 0.01
# Above this many discretisation points the PRV accountant needs > ~1 GB and many seconds
# (~200 bytes per point). Such grids only arise for ε in the hundreds; there we report the
# RDP bound instead, which is also a valid (if looser) upper bound on ε.
PRV_MAX_GRID = 5_000_000
MAX_SIGMA = 1e6
_RDP_RTOL = 1e-5  # calibration precision in σ (relative)
_PRV_RTOL = 1e-4


# ----------------------------------------------------------------------------- validation

def _real(key: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(float(value)):
        raise UserError(f"{key} must be {what}, got {value!r}")
    return float(value)


def _check_delta(delta: Any) -> float:
    d = _real("privacy.delta", delta, "a number in (0, 1)")
    if not 0.0 < d < 1.0:
        raise UserError(f"privacy.delta must be in (0, 1), got {delta!r}")
    return d


def _check_accountant(accountant: Any) -> str:
    if accountant not in ACCOUNTANTS:
        raise UserError(f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
    return accountant


def _check_sample_rate(sample_rate: Any) -> float:
    q = _real("train.batch_size", sample_rate, "a sample rate (batch_size / dataset size) in (0, 1]")
    if not 0.0 < q <= 1.0:
        raise UserError(f"train.batch_size: the sample rate batch_size / dataset size must be in (0, 1], "
                        f"got {sample_rate!r}")
    return q


def _check_sigma(noise_multiplier: Any, *, need_positive: bool) -> float:
    s = _real("privacy.noise_multiplier", noise_multiplier, "a number >= 0")
    if s < 0 or math.isinf(s):
        raise UserError(f"privacy.noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if need_positive and s == 0:
        raise UserError("privacy.noise_multiplier must be > 0 when privacy.target_epsilon is set "
                        "(no noise gives no finite epsilon)")
    return s


def _check_target(target_epsilon: Any) -> float:
    e = _real("privacy.target_epsilon", target_epsilon, "a number > 0")
    if not 0.0 < e < math.inf:
        raise UserError(f"privacy.target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    return e


def _check_steps(steps: Any, minimum: int = 0) -> int:
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < minimum:
        raise UserError(f"train.steps must be an integer >= {minimum}, got {steps!r}")
    return int(steps)


# ----------------------------------------------------------------------------- ε of a history

History = tuple[tuple[float, float, int], ...]  # ((σ, q, steps), ...), consecutive entries differ


@lru_cache(maxsize=256)
def _rdp_per_step(noise_multiplier: float, sample_rate: float):
    """Opacus's RDP curve of one subsampled-Gaussian step at the default orders (numpy array)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis
    return rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                    orders=RDPAccountant.DEFAULT_ALPHAS)


def _rdp_epsilon(history: History, delta: float) -> float:
    """Exactly what `RDPAccountant(history).get_epsilon(delta)` computes (same terms, same
    summation order: compute_rdp(steps=n) is n times the one-step curve), with the one-step
    curves cached so that re-evaluating a history that grew by one step costs ~1 ms."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis
    rdp = sum(_rdp_per_step(s, q) * n for s, q, n in history)
    with warnings.catch_warnings():
        # "optimal order is the smallest/largest alpha": only for ε far outside useful budgets.
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def _prv_grid_size(history: History, delta: float) -> float:
    """Number of points Opacus's PRVAccountant would discretise on (mirrors its _get_domain)."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size
    delta_error = delta / 1000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        half_width = compute_safe_domain_size(
            prvs=[PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history],
            max_self_compositions=[n for _, _, n in history],
            eps_error=PRV_EPS_ERROR, delta_error=delta_error)
    total = sum(n for _, _, n in history)
    mesh = PRV_EPS_ERROR / math.sqrt(total * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh


def _prv_epsilon(history: History, delta: float) -> float:
    from opacus.accountants import PRVAccountant
    if _prv_grid_size(history, delta) > PRV_MAX_GRID:
        return _rdp_epsilon(history, delta)
    acc = PRVAccountant()
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # exp overflow in the PRV cdf's masked branch
        warnings.simplefilter("ignore", UserWarning)  # RDP "optimal order" hints from its domain sizing
        return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))


def _rdp_floor(delta: float) -> float:
    """ε of RDP at σ = ∞ (zero RDP curve): the smallest ε the default orders can certify."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS,
                                                rdp=[0.0] * len(RDPAccountant.DEFAULT_ALPHAS), delta=delta)
    return float(eps)


def _history_epsilon(history: History, delta: float, accountant: str) -> float:
    history = tuple(h for h in history if h[2] > 0)
    if not history:
        return 0.0
    if any(s == 0 for s, _, _ in history):
        return math.inf
    return _rdp_epsilon(history, delta) if accountant == "rdp" else _prv_epsilon(history, delta)


def _append(history: History, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """History with `steps` more releases of (σ, q), merged into the last entry when identical."""
    if steps == 0:
        return history
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        s, q, n = history[-1]
        return history[:-1] + ((s, q, n + steps),)
    return history + ((noise_multiplier, sample_rate, steps),)


# ----------------------------------------------------------------------------- public functions

def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "rdp") -> float:
    """ε after `steps` Poisson-subsampled Gaussian steps (σ = noise_multiplier, q = sample_rate).

    accountant "rdp": Opacus's RDPAccountant with its default orders and the Balle et al. 2020
    RDP-to-(ε, δ) conversion. "prv": Opacus's PRVAccountant (Gopi et al. 2021), returning its
    upper bound (estimate + eps_error, eps_error = PRV_EPS_ERROR); if its grid would exceed
    PRV_MAX_GRID points (only for ε in the hundreds) the RDP bound is returned instead.
    σ = 0 gives inf; steps = 0 gives 0.0.
    """
    accountant = _check_accountant(accountant)
    delta = _check_delta(delta)
    s = _check_sigma(noise_multiplier, need_positive=False)
    q = _check_sample_rate(sample_rate)
    n = _check_steps(steps)
    return _history_epsilon(_append((), s, q, n), delta, accountant)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """Smallest noise multiplier σ (to ~1e-5 relative for RDP, ~1e-4 for PRV) with
    compute_epsilon(σ, sample_rate, steps, delta, accountant) <= target_epsilon.

    Safe side: of all σ evaluated by the search (a bracket, then Brent's method on
    log(ε/target) against log σ), the smallest whose ε is <= target is returned, after being
    verified once more and nudged up if needed, so the guarantee holds exactly for the
    accountant used (never rounded towards less noise). For PRV the bracket starts at the RDP answer (RDP is the looser bound, so its σ is
    already enough for PRV) and walks down, so PRV is never evaluated at tiny σ.
    Raises UserError when the target is unreachable with σ <= MAX_SIGMA (for PRV that includes
    any target below about PRV_EPS_ERROR).
    """
    accountant = _check_accountant(accountant)
    target = _check_target(target_epsilon)
    delta = _check_delta(delta)
    q = _check_sample_rate(sample_rate)
    n = _check_steps(steps, minimum=1)

    seen: dict[float, float] = {}  # σ -> ε, every evaluation of the search

    def eps(sigma: float) -> float:
        if sigma not in seen:
            seen[sigma] = _history_epsilon(((sigma, q, n),), delta, accountant)
        return seen[sigma]

    def unreachable() -> UserError:
        if accountant == "prv":
            why = f"the PRV accountant's ε carries an error of {PRV_EPS_ERROR}"
        else:
            why = (f"RDP over Opacus's default orders cannot certify ε below about {_rdp_floor(delta):.3g} "
                   f"at this δ; privacy.accountant=prv can go lower")
        return UserError(f"privacy.target_epsilon: ε = {target} at δ = {delta} over {n} steps at sample rate "
                         f"{q} is unreachable with noise multiplier <= {MAX_SIGMA:g} ({why})")

    if accountant == "rdp":
        rtol = _RDP_RTOL
        hi, lo = 1.0, None
        while eps(hi) > target:
            lo, hi = hi, hi * 2
            if hi > MAX_SIGMA:
                raise unreachable()
        if lo is None:  # ε(1) <= target: walk down until ε exceeds the target
            lo = hi / 2
            while eps(lo) <= target:
                hi, lo = lo, lo / 2
                if lo < 1e-6:
                    return hi
    else:
        rtol = _PRV_RTOL
        try:
            hi = calibrate_noise(target, delta, q, n, "rdp")
        except UserError:  # below RDP's floor: start from 1 and double
            hi = 1.0
        while eps(hi) > target:  # after RDP's σ (the looser bound) this practically never runs
            hi *= 2
            if hi > MAX_SIGMA:
                raise unreachable()
        lo = hi * 0.85
        while eps(lo) <= target:
            hi, lo = lo, lo * 0.85
            if lo < 1e-6:
                return hi

    # Brent's method on log(ε/target) against log σ (smooth, nearly linear there); every
    # evaluation is remembered and the smallest σ whose computed ε is <= target is returned.
    from scipy.optimize import brentq

    def g(x: float) -> float:
        return math.log(min(max(eps(math.exp(x)), 1e-300), 1e300) / target)

    # Stops once the sign-change bracket is narrower than rtol/4 in log σ; both its ends are in `seen`.
    brentq(g, math.log(lo), math.log(hi), xtol=rtol / 4, rtol=1e-15, maxiter=200)
    sigma = min(s for s, e in seen.items() if e <= target)
    # Safe side, verified afresh (not from the search's memo); should the accountant ever
    # disagree with itself, move σ up until it does not.
    while _history_epsilon(((sigma, q, n),), delta, accountant) > target:
        sigma *= 1 + rtol
    return sigma


# ----------------------------------------------------------------------------- ledger

class PrivacyLedger:
    """Composition of the noisy releases of a run: a history of (σ, q, steps) segments.

    Heterogeneous releases compose (the accountant sums RDP curves / convolves PRVs);
    consecutive identical (σ, q) records merge into one segment, so a run with a fixed
    configuration keeps a one-entry history. ε uses the accountant named at construction
    (see compute_epsilon for the papers and conversions); the last value is cached, so calling
    `epsilon()` every step costs nothing until something new is recorded.
    """

    def __init__(self, delta: float, accountant: str = "rdp", target_epsilon: float | None = None):
        self.delta = _check_delta(delta)
        self.accountant = _check_accountant(accountant)
        self.target_epsilon = None if target_epsilon is None else _check_target(target_epsilon)
        self._history: History = ()
        self._cache: dict[History, float] = {}  # history -> ε, a few entries

    # -- recording

    def _validate(self, noise_multiplier, sample_rate, steps) -> tuple[float, float, int]:
        s = _check_sigma(noise_multiplier, need_positive=self.target_epsilon is not None)
        return s, _check_sample_rate(sample_rate), _check_steps(steps)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Account for `steps` more logical steps at (σ, q)."""
        self._history = _append(self._history, *self._validate(noise_multiplier, sample_rate, steps))

    @property
    def steps(self) -> int:
        """Total recorded logical steps."""
        return sum(n for _, _, n in self._history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(self._history)

    # -- ε

    def _epsilon_of(self, history: History) -> float:
        if history not in self._cache:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[history] = _history_epsilon(history, self.delta, self.accountant)
        return self._cache[history]

    def epsilon(self) -> float:
        """ε spent so far at this ledger's δ (0.0 when nothing is recorded)."""
        return self._epsilon_of(self._history)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        """ε after recording (σ, q, steps), without recording it."""
        return self._epsilon_of(_append(self._history, *self._validate(noise_multiplier, sample_rate, steps)))

    def would_exceed(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> bool:
        """True when a target ε is set and recording (σ, q, steps) would take ε above it."""
        if self.target_epsilon is None:
            return False
        return self.epsilon_if(noise_multiplier, sample_rate, steps) > self.target_epsilon

    # -- checkpointing

    def state_dict(self) -> dict:
        """Plain ints/floats/strings/lists only (loadable with torch.load(weights_only=True)).
        "target_epsilon" is present only when a target is set."""
        state: dict[str, Any] = {
            "history": [[float(s), float(q), int(n)] for s, q, n in self._history],
            "delta": self.delta,
            "accountant": self.accountant,
        }
        if self.target_epsilon is not None:
            state["target_epsilon"] = self.target_epsilon
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the history. δ and the accountant must match this ledger's (ε at another δ,
        or from another accountant, is a different quantity). The target ε stays this ledger's
        (the config's): raising or lowering the budget on resume is allowed."""
        missing = {"history", "delta", "accountant"} - set(state)
        if missing:
            raise UserError(f"checkpoint: privacy ledger state lacks {sorted(missing)}")
        if state["accountant"] != self.accountant:
            raise UserError(f"privacy.accountant: checkpoint was accounted with {state['accountant']!r}, "
                            f"config has {self.accountant!r}; the spent ε cannot be carried over")
        try:
            delta = float(state["delta"])
        except (TypeError, ValueError):
            raise UserError(f"checkpoint: privacy ledger delta is not a number: {state['delta']!r}") from None
        if not math.isclose(delta, self.delta, rel_tol=1e-12, abs_tol=0.0):
            raise UserError(f"privacy.delta: checkpoint was accounted at delta {delta:g}, config has "
                            f"{self.delta:g}; the spent ε cannot be carried over")
        history: History = ()
        for entry in state["history"]:
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise UserError(f"checkpoint: privacy ledger history entry {entry!r} is not [sigma, rate, steps]")
            try:
                s = _check_sigma(entry[0], need_positive=False)
                q = _check_sample_rate(entry[1])
                n = _check_steps(entry[2])
            except UserError as e:
                raise UserError(f"checkpoint: privacy ledger history entry {list(entry)!r} is invalid ({e})") from None
            history = _append(history, s, q, n)
        self._history = history

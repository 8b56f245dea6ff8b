"""Reading a speed-up off final losses at several training budgets.

Wen et al. (2025) define an optimizer's speed-up over a baseline as the ratio of the budget the
baseline spends to reach its final loss to the budget the optimizer needs to reach the same loss,
each at its best setting, and insist that every loss be read at the end of a run's own learning-rate
schedule: a cosine run's loss at step s of a longer run is not what a run of s steps reaches, and
rankings can flip while the rate decays. So the candidate's side is not one training curve but a
ladder of runs, one per budget, each ending its own schedule; `budget_to_reach` interpolates between
their final losses.

Interpolation: linear in log(budget) between the two ladder runs that bracket the target, since
final loss falls roughly as a power of the budget (straight in log-budget over a factor of 2). A
simplification of the paper, which fits a scaling law of the baseline's loss in the data budget
instead: with two to five budgets per curve there is nothing to fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Reach:
    """The budget at which a ladder reaches a loss. `bound`: "exact" (interpolated between two runs),
    "at_most" (the smallest budget run already reaches it: the true budget is this or less), or
    "never" (no run reaches it: budget None, the true budget is above the largest run's)."""

    budget: Optional[float]
    bound: str


def budget_to_reach(ladder: Sequence[tuple[float, float]], target: float) -> Reach:
    """The smallest budget at which the final losses of `ladder` [(budget, final loss), ...] reach
    `target` (loss <= target), interpolated linearly in log(budget) between the last run above it and
    the first at or below it. A non-finite loss (a diverged run) never reaches anything."""
    points = sorted((float(b), float(loss)) for b, loss in ladder)
    if any(b <= 0 for b, _ in points):
        raise ValueError(f"budgets must be positive, got {[b for b, _ in points]}")
    prev: Optional[tuple[float, float]] = None
    for budget, loss in points:
        if math.isfinite(loss) and loss <= target:
            if prev is None:
                return Reach(budget, "at_most")
            (b0, l0), (b1, l1) = prev, (budget, loss)
            if not math.isfinite(l0):  # the run before diverged: nothing to interpolate from
                return Reach(budget, "at_most")
            frac = (l0 - target) / (l0 - l1)
            return Reach(math.exp(math.log(b0) + frac * (math.log(b1) - math.log(b0))), "exact")
        prev = (budget, loss)
    return Reach(None, "never")


def speedup(baseline_budget: float, reach: Reach) -> tuple[Optional[float], str]:
    """(baseline budget / the candidate's budget to the baseline's final loss, its bound): "exact",
    "at_least" (the candidate's smallest run already reached it) or "below" (never reached: the
    speed-up is below baseline_budget / the largest run's budget, and None is returned)."""
    if reach.budget is None:
        return None, "below"
    return baseline_budget / reach.budget, ("exact" if reach.bound == "exact" else "at_least")

"""The speed-up reader of `bench optimizers` on hand-made ladders of final losses (one run per budget,
each ending its own schedule): linear interpolation in log-steps between the bracketing runs, with
the bounds it reports when the target lies outside the ladder."""

from __future__ import annotations

import math

import pytest

from dist_train.bench.speedup import Reach, budget_to_reach, speedup

LADDER = [(25, 3.0), (50, 2.5), (100, 2.0), (200, 1.8), (400, 1.7)]


def test_interpolates_linearly_in_log_steps_between_the_bracketing_runs() -> None:
    # 2.2 lies 0.6 of the way from 2.5 (50 steps) to 2.0 (100 steps): log-steps log 50 + 0.6 log 2
    reach = budget_to_reach(LADDER, 2.2)
    assert reach.bound == "exact" and reach.budget == pytest.approx(50 * 2 ** 0.6)
    assert speedup(100, reach) == (pytest.approx(100 / (50 * 2 ** 0.6)), "exact")  # 1.32
    # 1.75: halfway (in loss) from 200 to 400 steps: sqrt(200 * 400) steps
    assert budget_to_reach(LADDER, 1.75).budget == pytest.approx(math.sqrt(200 * 400))
    assert budget_to_reach(LADDER, 2.0) == Reach(pytest.approx(100.0), "exact")  # reached exactly by a run
    assert budget_to_reach(list(reversed(LADDER)), 2.2).budget == pytest.approx(50 * 2 ** 0.6)  # order irrelevant


def test_outside_the_ladder_it_reports_a_bound_not_a_number_it_does_not_have() -> None:
    first = budget_to_reach(LADDER, 3.2)  # the shortest run already beats it
    assert first == Reach(25.0, "at_most")
    assert speedup(100, first) == (4.0, "at_least")
    never = budget_to_reach(LADDER, 1.6)
    assert never == Reach(None, "never") and speedup(400, never) == (None, "below")


def test_the_first_crossing_counts_and_diverged_runs_reach_nothing() -> None:
    noisy = [(25, 3.0), (50, 2.0), (100, 2.6), (200, 1.9)]
    assert budget_to_reach(noisy, 2.5).budget == pytest.approx(25 * 2 ** 0.5)
    assert budget_to_reach([(25, math.nan), (50, 3.0), (100, 1.0)], 2.0).budget == pytest.approx(50 * 2 ** 0.5)
    assert budget_to_reach([(25, math.inf), (50, 1.0)], 2.0) == Reach(50.0, "at_most")
    assert budget_to_reach([(25, math.nan), (50, math.nan)], 2.0).bound == "never"
    with pytest.raises(ValueError, match="budgets must be positive"):
        budget_to_reach([(0, 1.0)], 2.0)

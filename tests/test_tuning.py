"""The coordinate-descent tuner of `bench optimizers` on synthetic objectives: it stops at a point whose
every neighbour (one ladder step along any one axis) is worse, each setting is evaluated once, ties
and failed runs never move it, and a start off the ladder is refused."""

from __future__ import annotations

import itertools
import math

import pytest

from dist_train.bench.tuning import Axis, CoordinateDescent, geometric

AXES = [Axis("lr", geometric(1e-2, 2.0, 4, 4)), Axis("warmup", (0.0, 0.05, 0.1, 0.2, 0.4)),
        Axis("beta2", (0.9, 0.95, 0.98, 0.99))]


def _counting(objective):
    calls: list[list[dict]] = []

    def evaluate_many(settings):
        calls.append([dict(s) for s in settings])
        return [objective(s) for s in settings]
    return evaluate_many, calls


def _neighbours(axes, setting):
    for axis in axes:
        i = axis.index(setting[axis.name])
        for j in (i - 1, i + 1):
            if 0 <= j < len(axis.values):
                yield {**setting, axis.name: axis.values[j]}


def bowl(s: dict) -> float:
    """A coupled convex bowl in ladder coordinates, minimum at lr 0.04, warmup 0.1, beta2 0.98."""
    a, b, c = math.log2(s["lr"] / 0.04), AXES[1].index(s["warmup"]) - 2, AXES[2].index(s["beta2"]) - 2
    return a * a + b * b + c * c + 0.5 * a * b + 1.0


def test_descends_to_the_minimum_and_every_neighbour_is_worse() -> None:
    evaluate_many, calls = _counting(bowl)
    start = {"lr": geometric(1e-2, 2.0, 4, 4)[0], "warmup": 0.4, "beta2": 0.9, "fixed": "kept"}
    result = CoordinateDescent(AXES, start, evaluate_many).run()
    assert result.converged
    assert (result.best["lr"], result.best["warmup"], result.best["beta2"]) == (0.04, 0.1, 0.98)
    assert result.best["fixed"] == "kept"  # entries that are not axes pass through
    assert result.value == bowl(result.best) == 1.0
    for n in _neighbours(AXES, result.best):
        assert bowl(n) > result.value
    # The final check is recorded: both neighbours of every axis, with their values.
    assert {k: len(v) for k, v in result.neighbours.items()} == {"lr": 2, "warmup": 2, "beta2": 2}
    assert all(v > result.value for pairs in result.neighbours.values() for _, v in pairs)
    # Each setting evaluated once, and the trials are exactly the evaluated settings.
    seen = [tuple(sorted(s.items())) for batch in calls for s in batch]
    assert len(seen) == len(set(seen)) == result.evaluations
    # A coordinate's two neighbours are asked for together (the pool runs them side by side).
    assert max(len(batch) for batch in calls) == 2


def test_a_local_minimum_stops_it_where_every_neighbour_is_worse() -> None:
    """Two basins along lr (ladder ends 1e-2/16 and 1e-2*16), the start in the worse one: coordinate
    descent is a local method, and it must stop at the local minimum, not wander or cycle."""
    lrs = AXES[0].values

    def two_basins(s: dict) -> float:
        i = lrs.index(s["lr"])
        lr_part = min((i - 1) ** 2 + 0.5, (i - 7) ** 2)  # local min at index 1 (0.5), global at 7 (0.0)
        return lr_part + (AXES[2].index(s["beta2"]) - 1) ** 2

    evaluate_many, _ = _counting(two_basins)
    result = CoordinateDescent([AXES[0], AXES[2]], {"lr": lrs[0], "beta2": 0.99}, evaluate_many).run()
    assert result.converged and result.best == {"lr": lrs[1], "beta2": 0.95} and result.value == 0.5
    for n in _neighbours([AXES[0], AXES[2]], result.best):
        assert two_basins(n) > result.value


def test_it_keeps_stepping_along_an_axis_while_it_improves() -> None:
    """From one end of a long ladder to the other end's minimum in a single pass: after the first
    improving neighbour it walks on in that direction, one run at a time."""
    ladder = Axis("x", tuple(range(10)))
    evaluate_many, calls = _counting(lambda s: (s["x"] - 8) ** 2)
    result = CoordinateDescent([ladder], {"x": 0}, evaluate_many).run()
    assert result.best == {"x": 8} and result.passes == 2  # the second pass only confirms
    # the start, then 1 (its only neighbour), then 2..9 one at a time; the confirming pass asks for nothing new
    assert [len(b) for b in calls] == [1] * 10
    assert result.evaluations == 10


def test_ties_and_failed_runs_never_move_the_incumbent() -> None:
    axis = Axis("lr", (1e-3, 2e-3, 4e-3))
    flat, _ = _counting(lambda s: 2.0)
    assert CoordinateDescent([axis], {"lr": 2e-3}, flat).run().best == {"lr": 2e-3}
    failing, _ = _counting(lambda s: 3.0 if s["lr"] == 2e-3 else (math.nan if s["lr"] > 2e-3 else None))
    result = CoordinateDescent([axis], {"lr": 2e-3}, failing).run()
    assert result.best == {"lr": 2e-3} and result.value == 3.0
    assert sorted(t.value for t in result.trials) == [3.0, math.inf, math.inf]


def test_max_passes_is_reported_as_not_converged() -> None:
    evaluate_many, _ = _counting(bowl)
    start = {"lr": geometric(1e-2, 2.0, 4, 4)[0], "warmup": 0.4, "beta2": 0.9}
    result = CoordinateDescent(AXES, start, evaluate_many, max_passes=1).run()
    assert result.passes == 1 and not result.converged


def test_bad_ladders_and_starts_are_refused() -> None:
    with pytest.raises(ValueError, match="axis lr: 0.5 is not on its ladder"):
        CoordinateDescent(AXES[:1], {"lr": 0.5}, lambda s: [0.0] * len(s))
    with pytest.raises(ValueError, match="two or more distinct values"):
        Axis("wd", (0.1, 0.1))
    with pytest.raises(ValueError, match="at least one axis"):
        CoordinateDescent([], {}, lambda s: [0.0] * len(s))


def test_geometric_ladders_are_a_constant_factor_apart() -> None:
    ladder = geometric(3e-3, 2.0, 2, 3)
    assert ladder == (7.5e-4, 1.5e-3, 3e-3, 6e-3, 1.2e-2, 2.4e-2)
    assert all(b / a == pytest.approx(2.0, rel=1e-3) for a, b in itertools.pairwise(ladder))

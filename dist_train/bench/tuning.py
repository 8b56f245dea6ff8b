"""Coordinate-descent hyperparameter tuning, as in Wen et al., "Fantastic Pretraining Optimizers and
Where to Find Them" (2025), section 3: each hyperparameter has a ladder of values; starting from an
incumbent, sweep one hyperparameter at a time to its ladder neighbours, move to a neighbour that
improves the objective (and keep stepping that way while it does), and stop when a whole pass over
the hyperparameters moves nothing, i.e. when every neighbour of the incumbent (one ladder step up or
down in any one hyperparameter) is no better.

The objective is a function of a setting (a dict name -> value) returning a loss; runs that fail or
diverge count as +inf. Settings are evaluated through `evaluate_many`, a batch at a time (both
neighbours of a coordinate at once), so a caller with a pool of workers keeps it busy; each setting is
evaluated once (memoised), so the confirming pass costs only the neighbours not seen yet.

Why by hand: the tuners that are well kept (Optuna, Ray Tune, Ax) search by sampling or Bayesian
optimisation; none offers this deterministic one-coordinate-at-a-time descent with its stopping
rule, which is what the paper prescribes and what its comparison's fairness rests on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence

Setting = dict[str, Any]
EvaluateMany = Callable[[list[Setting]], list[float]]


@dataclass(frozen=True)
class Axis:
    """One hyperparameter: its name and its ordered ladder of values (neighbours are adjacent entries)."""

    name: str
    values: tuple

    def __post_init__(self) -> None:
        if len(self.values) < 2 or len(set(self.values)) != len(self.values):
            raise ValueError(f"axis {self.name}: needs two or more distinct values, got {self.values}")

    def index(self, value: Any) -> int:
        for i, v in enumerate(self.values):
            if v == value or (isinstance(v, float) and isinstance(value, float) and math.isclose(v, value)):
                return i
        raise ValueError(f"axis {self.name}: {value!r} is not on its ladder {self.values}")


def geometric(center: float, factor: float, below: int, above: int) -> tuple[float, ...]:
    """A ladder center * factor**k for k in [-below, above], rounded to 4 significant digits so that
    the values print and compare cleanly."""
    return tuple(float(f"{center * factor ** k:.4g}") for k in range(-below, above + 1))


@dataclass
class Trial:
    setting: Setting
    value: float
    pass_no: int


@dataclass
class DescentResult:
    best: Setting
    value: float
    trials: list[Trial]  # every distinct setting evaluated, in order
    passes: int
    converged: bool  # False: stopped by max_passes with a pass that still moved
    neighbours: dict[str, list[tuple[Any, float]]] = field(default_factory=dict)  # the final check, per axis

    @property
    def evaluations(self) -> int:
        return len(self.trials)


def _key(setting: Setting) -> Hashable:
    return tuple(sorted(setting.items()))


class CoordinateDescent:
    """Tune `axes` (in this order, every pass) from `start` by coordinate descent.

    `start` must hold a ladder value for every axis; it may hold other fixed entries too (passed
    through to the objective unchanged). A neighbour replaces the incumbent only when strictly
    better, so ties keep the incumbent and the descent cannot cycle."""

    def __init__(self, axes: Sequence[Axis], start: Setting, evaluate_many: EvaluateMany, max_passes: int = 8):
        if not axes:
            raise ValueError("coordinate descent needs at least one axis")
        for axis in axes:
            axis.index(start[axis.name])  # on the ladder, or a ValueError naming it
        self.axes, self.start, self.evaluate_many, self.max_passes = list(axes), dict(start), evaluate_many, max_passes
        self._seen: dict[Hashable, float] = {}
        self._trials: list[Trial] = []
        self._pass = 0

    def _values(self, settings: list[Setting]) -> list[float]:
        todo = [s for s in settings if _key(s) not in self._seen]
        unique = list({_key(s): s for s in todo}.values())
        if unique:
            results = self.evaluate_many(unique)
            for s, v in zip(unique, results):
                v = float(v) if v is not None and math.isfinite(float(v)) else math.inf
                self._seen[_key(s)] = v
                self._trials.append(Trial(dict(s), v, self._pass))
        return [self._seen[_key(s)] for s in settings]

    def _neighbour(self, setting: Setting, axis: Axis, step: int) -> Optional[Setting]:
        i = axis.index(setting[axis.name]) + step
        return {**setting, axis.name: axis.values[i]} if 0 <= i < len(axis.values) else None

    def _sweep_axis(self, x: Setting, fx: float, axis: Axis) -> tuple[Setting, float, bool]:
        """Both neighbours along `axis` at once; move to the better if it beats the incumbent, then
        keep stepping that way while each step improves."""
        candidates = [(step, n) for step in (-1, 1) if (n := self._neighbour(x, axis, step)) is not None]
        values = self._values([n for _, n in candidates])
        step, best, value = min(((s, n, v) for (s, n), v in zip(candidates, values)), key=lambda t: t[2])
        if not value < fx:
            return x, fx, False
        x, fx = best, value
        while (n := self._neighbour(x, axis, step)) is not None:
            (v,) = self._values([n])
            if not v < fx:
                break
            x, fx = n, v
        return x, fx, True

    def run(self) -> DescentResult:
        x = dict(self.start)
        (fx,) = self._values([x])
        moved = True
        while moved and self._pass < self.max_passes:
            self._pass += 1
            moved = False
            for axis in self.axes:
                x, fx, did = self._sweep_axis(x, fx, axis)
                moved = moved or did
        neighbours = {a.name: [(n[a.name], self._seen[_key(n)]) for step in (-1, 1)
                               if (n := self._neighbour(x, a, step)) is not None and _key(n) in self._seen]
                      for a in self.axes}
        return DescentResult(x, fx, list(self._trials), self._pass, converged=not moved, neighbours=neighbours)

"""Which variants of a parametrized test the fast tier (`make test-fast`) runs.

A multi-process test repeated over backends, layouts or world sizes exercises the same code path
in each variant. The fast tier runs the first variant, so every package is still exercised in the
edit-test loop; `make test` (and CI) runs them all. A variant is `slow` when it is marked so here,
not because of its position in the list: `fast_first` says which one is first on purpose."""

from __future__ import annotations

import pytest


def slow(*values, id: str | None = None):
    """One parametrize entry that only `make test` runs (`values` as `pytest.param` takes them)."""
    return pytest.param(*values, marks=pytest.mark.slow, id=id)


def fast_first(first, *rest) -> list:
    """`[first, *rest]` with every entry but the first marked slow. Tuples are one multi-name entry."""
    return [first, *(slow(*v) if isinstance(v, tuple) else slow(v) for v in rest)]

"""`run_on_ranks` (dist_train/bench/_spawn.py), which the benchmarks and the multi-process tests
start their ranks with: rank 0's answer comes back, a fork server's workers see the environment
they are given (not the server's, frozen when it started), and a run past its limit is killed."""

from __future__ import annotations

import os
import time

import pytest

from cli_helpers import FORK_PRELOAD
from dist_train.bench._spawn import run_on_ranks
from tiers import slow


def _environment(rank: int, world: int, *names: str) -> dict:
    return {"rank": rank, "world": world, **{n: os.environ.get(n) for n in names}}


def _sleep(rank: int, world: int, seconds: float) -> None:
    time.sleep(seconds)


@pytest.mark.parametrize("preload", [slow((), id="spawn"), pytest.param(FORK_PRELOAD, id="forkserver")])
def test_workers_get_the_given_environment_and_their_ranks(preload, monkeypatch):
    monkeypatch.setenv("DIST_TRAIN_SPAWN_PROBE", "caller")
    env = {"PATH": os.environ.get("PATH", ""), "DIST_TRAIN_SPAWN_GIVEN": "given"}
    got = run_on_ranks(_environment, nprocs=2, args=("DIST_TRAIN_SPAWN_PROBE", "DIST_TRAIN_SPAWN_GIVEN", "RANK",
                                                     "WORLD_SIZE", "OMP_NUM_THREADS"), preload=preload, env=env)
    # Rank 0 answers; the given environment replaces the inherited one, plus the rank and thread variables.
    assert got == {"rank": 0, "world": 2, "DIST_TRAIN_SPAWN_PROBE": None, "DIST_TRAIN_SPAWN_GIVEN": "given",
                   "RANK": "0", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    inherited = run_on_ranks(_environment, nprocs=1, args=("DIST_TRAIN_SPAWN_GIVEN",), preload=preload)
    assert inherited["DIST_TRAIN_SPAWN_GIVEN"] is None  # nothing of the last call's environment stays


def test_a_run_past_its_limit_is_killed():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="_sleep on 2 ranks ran past 3 s"):
        run_on_ranks(_sleep, nprocs=2, args=(600,), preload=FORK_PRELOAD, timeout_s=3)
    assert time.monotonic() - start < 120  # killed, not waited for

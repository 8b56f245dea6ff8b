"""The memory refusal: a run whose planned memory per rank (plan's figures) exceeds what a rank has is
refused in seconds, before anything starts, with the figures and the key that lifts the check."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cli_helpers import assert_user_error, cli, forked_cli, forked_run
from dist_train.train.memory_check import available_ram

REPO = Path(__file__).resolve().parents[1]
TINY = ["quickstart.yaml", "parallel.stages=1", "model.n_layer=1", "model.width=16", "model.n_head=2",
        "model.block_size=8", "data.max_bytes=20000", "train.batch_size=4", "train.steps=1", "train.eval_batches=1",
        "telemetry.progress=off", "telemetry.tensorboard=false", "runtime.threads=1",
        "train.sample_tokens=0"]  # the quickstart generates 200 tokens after training


@pytest.mark.skipif(available_ram() > 80 * 2**30, reason="this machine has room for the ~90 GiB plan")
@pytest.mark.parametrize("call", [forked_cli, pytest.param(cli, marks=pytest.mark.slow)], ids=["forked", "process"])
def test_huge_context_is_refused_in_seconds(tmp_path, call):
    start = time.monotonic()
    proc = call(["run", str(REPO / "configs/gpt_ddp.yaml"), "model.block_size=100000", f"run.dir={tmp_path}"],
                cwd=tmp_path)
    line = assert_user_error(proc, "runtime.memory_check: the plan needs ~", "activations ~", "available RAM",
                             "runtime.memory_check=false")
    assert time.monotonic() - start < 60, line
    assert not (tmp_path / "gpt_ddp").exists()  # nothing started: no run directory


def test_refused_against_the_configured_figure(tmp_path):
    proc = forked_cli(["run", str(REPO / "configs/gpt_ddp.yaml"), "model.block_size=4096",
                       "runtime.memory_per_rank_gb=1", f"run.dir={tmp_path}"], cwd=tmp_path)
    assert_user_error(proc, "a rank has 1.0 GiB (runtime.memory_per_rank_gb)", "weights 5.3 MiB", "activations ~3712.0 MiB")
    assert not (tmp_path / "gpt_ddp").exists()


def test_normal_run_is_not_refused(tmp_path):
    assert "done: step 1" in forked_run([*TINY, f"run.dir={tmp_path}"], cwd=tmp_path)


def test_override_key_lets_it_through(tmp_path):
    refused = forked_cli(["run", *TINY, "runtime.memory_per_rank_gb=0.0001", f"run.dir={tmp_path}"], cwd=tmp_path)
    assert_user_error(refused, "runtime.memory_check")
    out = forked_run([*TINY, "runtime.memory_per_rank_gb=0.0001", "runtime.memory_check=false", f"run.dir={tmp_path}"],
                     cwd=tmp_path)
    assert "done: step 1" in out


@pytest.mark.slow
def test_launch_refuses_once_before_starting_workers(tmp_path):
    proc = cli(["launch", *TINY[:1], "--nproc", "2", *TINY[1:], "runtime.memory_per_rank_gb=0.0001",
                f"run.dir={tmp_path}"], cwd=tmp_path)
    assert_user_error(proc, "runtime.memory_check: the plan needs", "runtime.memory_per_rank_gb")

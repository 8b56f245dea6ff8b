"""Muon and NorMuon through the real CLI: training runs on 2 (and 4, also as HSDP 2 x 2) gloo ranks
reproduce the single-process run, resume exactly, work inside local-learning stages, and refuse what
they cannot do.

Tolerances are the float32 ones of test_backends_multiproc.py (loss rel 1e-4, grad norm rel 1e-3:
reduction order only); the fp64 rtol-1e-10 equality of the optimizer step itself is in
test_muon_distributed.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cli_helpers import forked_cli, forked_run
from dist_train.config import load_config
from dist_train.train.local_reference import local_reference
from test_backends_multiproc import NO_CKPT, assert_same_run
from tiers import fast_first

STEPS = 5
OPTIMIZERS = {
    "muon": ["optim.name=muon", "optim.lr=0.02", "optim.matrix.adamw_lr=0.003", "optim.weight_decay=0.01"],
    "normuon": ["optim.name=normuon", "optim.lr=0.003", "optim.weight_decay=0.01",
                "optim.matrix.ns_coefficients=polar_express"],
}


@pytest.fixture(scope="module")
def references(dt, tmp_path_factory) -> dict:
    return {name: dt.run(tmp_path_factory.mktemp(f"ref-{name}"), "single", *dt.TINY_GPT, *NO_CKPT, *opts,
                         steps=STEPS)
            for name, opts in OPTIMIZERS.items()}


# 2 ranks x 2 micro-batches of 2 = the single process's batch of 8: Newton–Schulz runs once per
# optimizer step on the accumulated gradient (on the micro-batch it would not match).
@pytest.mark.parametrize("backend", fast_first("ddp", "fsdp"))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_two_ranks_with_accumulation_match_single_process(dt, tmp_path, references, backend, optimizer):
    got = dt.forked(tmp_path, backend, *dt.TINY_GPT, *NO_CKPT, *OPTIMIZERS[optimizer],
                    f"parallel.backend={backend}", "train.grad_accum=2", steps=STEPS)
    assert_same_run(got, references[optimizer], steps=STEPS)
    ref = references[optimizer]
    assert ref[0]["loss"] - ref[-1]["loss"] > 0.05, "the reference did not train"


@pytest.mark.parametrize("optimizer", fast_first("muon", "normuon"))
def test_hsdp_2x2_matches_single_process(dt, tmp_path, references, optimizer):
    """4 ranks as HSDP 2 x 2 (parallel.dp_replicate=2; 2 examples each = the batch of 8): the
    matrices are (Replicate(), Shard(0)) DTensors, orthogonalised by owners inside each shard group."""
    got = dt.forked(tmp_path, "hsdp", *dt.TINY_GPT, *NO_CKPT, *OPTIMIZERS[optimizer], "parallel.backend=fsdp",
                    "parallel.dp_replicate=2", steps=STEPS, nproc=4)
    assert_same_run(got, references[optimizer], steps=STEPS)


def test_muon_differs_from_adamw(dt, tmp_path, references):
    """Not vacuous: the run really used Muon (AdamW with the same lr gives other losses)."""
    adamw = dt.run(tmp_path, "adamw", *dt.TINY_GPT, *NO_CKPT, "optim.lr=0.02", steps=STEPS)
    with pytest.raises(AssertionError):
        assert_same_run(adamw, references["muon"], steps=STEPS)


@pytest.mark.parametrize("backend", fast_first("ddp", "fsdp"))
def test_resume_restores_sharded_optimizer_state(dt, tmp_path, backend):
    """6 steps straight == 3 steps, checkpoint, then resumed to 6 (the momenta live on their owner
    ranks or as row shards; a lost or misplaced momentum changes step 4 by far more than 1e-5)."""
    cfg = [*dt.TINY_GPT, *OPTIMIZERS["normuon"], f"parallel.backend={backend}", "optim.schedule=constant"]
    straight = dt.forked(tmp_path / "a", "run", *cfg, *NO_CKPT, steps=6)
    dt.forked(tmp_path / "b", "run", *cfg, "checkpoint.every=3", steps=3)
    resumed = dt.forked(tmp_path / "b", "run", *cfg, *NO_CKPT, steps=6)
    for got, want in zip(resumed[3:], straight[3:]):
        assert got["step"] == want["step"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), f"step {want['step']}"


@pytest.mark.slow
def test_resume_on_another_world_size(dt, tmp_path):
    """The checkpoint names every state by parameter: saved by 2 DDP ranks (each momentum on its
    owner), it loads into one process that owns everything, and training continues as it would have."""
    cfg = [*dt.TINY_GPT, *OPTIMIZERS["muon"], "optim.schedule=constant"]
    straight = dt.forked(tmp_path / "a", "run", *cfg, "parallel.backend=ddp", *NO_CKPT, steps=6)
    dt.forked(tmp_path / "b", "run", *cfg, "parallel.backend=ddp", "checkpoint.every=3", steps=3)
    resumed = dt.run(tmp_path / "b", "run", *cfg, *NO_CKPT, steps=6)
    for got, want in zip(resumed[3:], straight[3:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), f"step {want['step']}"


LOCAL = ["model.n_layer=4", "model.width=32", "model.n_head=2", "model.block_size=16", "data.max_bytes=200000",
         "train.batch_size=8", "train.steps=5", "train.log_every=1", "train.eval_batches=2",
         "optim.warmup_steps=2", "optim.schedule=constant", "checkpoint.at_end=false", "parallel.stages=2"]


@pytest.mark.parametrize("backend,optimizer", fast_first(("ddp", "muon"), ("fsdp", "normuon")))
def test_local_stages_with_replicas_match_the_reference(tmp_path, backend, optimizer):
    """4 ranks = 2 stages x 2 replicas: each stage orthogonalises over its own 2-rank sub-mesh."""
    overrides = [*LOCAL, *OPTIMIZERS[optimizer], f"parallel.backend={backend}"]
    forked_run(["quickstart.yaml", f"run.dir={tmp_path}", "run.name=dp", *overrides], tmp_path, nproc=4, timeout=400)
    ref = local_reference(load_config(None, [f"run.dir={tmp_path}", *overrides]))
    for k in range(2):
        rows = (tmp_path / "dp" / "stages" / f"stage{k}" / "metrics.jsonl").read_text().splitlines()
        got = [json.loads(r)["loss"] for r in rows]
        assert got == pytest.approx(ref["losses"][k], rel=1e-4), f"stage {k}"
    assert ref["losses"][1][0] != pytest.approx(ref["losses"][1][-1], rel=1e-3)


def _plan(*overrides: str) -> subprocess.CompletedProcess:
    return forked_cli(["plan", "quickstart.yaml", "--nproc", "2", *overrides], Path.cwd())


@pytest.mark.parametrize("backend", ["deepspeed", "fairscale"])
def test_flattening_backends_are_refused_at_plan_time(backend):
    proc = _plan("parallel.stages=1", "optim.name=muon", f"parallel.backend={backend}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.name" in lines[0] and backend in lines[0], proc.stderr


def test_plan_shows_routing_and_optimizer_state():
    proc = _plan("parallel.stages=1", "parallel.backend=ddp", "optim.name=normuon")
    assert proc.returncode == 0, proc.stderr
    assert "normuon" in proc.stdout and "orthogonalised" in proc.stdout, proc.stdout


def test_plan_divides_matrix_state_over_a_shard_group_under_hsdp():
    proc = forked_cli(["plan", "quickstart.yaml", "--nproc", "4", "parallel.stages=1", "parallel.backend=fsdp",
                       "parallel.dp_replicate=2", "optim.name=muon"], Path.cwd())
    assert proc.returncode == 0, proc.stderr
    assert "by one owner rank each of a shard group (2 replica groups)" in proc.stdout, proc.stdout


def test_bad_matrix_pattern_is_one_line_exit_2():
    proc = _plan("parallel.stages=1", "optim.name=muon", "optim.matrix.matrix_params=[blocks.0.ln1.weight]")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ln1.weight" in lines[0], proc.stderr

"""Data parallelism inside local-learning stages: 4 gloo ranks as 2 stages x 2 replicas, each stage
running the configured backend (DDP, FSDP2, DeepSpeed ZeRO) on its own sub-mesh.

The reference is the same 2 stages trained one after the other in one process on the whole batch:
replicas split the batch and average gradients, so the per-stage losses (mean over replicas) must
agree with it up to float32 reduction order (rel 1e-4), and so must the validation loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import forked_run
from dist_train.config import load_config
from dist_train.train.local_reference import local_reference
from tiers import fast_first

TINY = ["model.n_layer=4", "model.width=32", "model.n_head=2", "model.block_size=16", "data.max_bytes=200000",
        "train.batch_size=8", "train.steps=5", "train.log_every=1", "train.eval_batches=2",
        "optim.warmup_steps=2", "optim.schedule=constant", "checkpoint.at_end=true", "parallel.stages=2",
        "train.sample_tokens=0"]  # the quickstart generates 200 tokens through the stages after training


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _launch(run_dir: Path, *overrides: str) -> None:
    forked_run(["quickstart.yaml", f"run.dir={run_dir}", "run.name=dp", *overrides], run_dir, nproc=4, timeout=400)


@pytest.mark.parametrize("backend", fast_first("ddp", "fsdp", "deepspeed"))
def test_replicated_stages_match_the_single_process_reference(tmp_path, backend):
    overrides = [*TINY, f"parallel.backend={backend}"]
    _launch(tmp_path, *overrides)
    ref = local_reference(load_config(None, [f"run.dir={tmp_path}", *overrides]))
    run = tmp_path / "dp"
    for k in range(2):
        got = [r["loss"] for r in _records(run / "stages" / f"stage{k}" / "metrics.jsonl")]
        assert got == pytest.approx(ref["losses"][k], rel=1e-4), f"stage {k}"
    assert _records(run / "metrics.jsonl")[-1]["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-4)
    # Not vacuous: the reference moves, and a half-batch (unaveraged) replica would not match it.
    assert ref["losses"][1][0] != pytest.approx(ref["losses"][1][-1], rel=1e-3)
    if backend in ("fsdp", "deepspeed"):
        # Each stage's shards went to the one checkpoint folder under its own key (DCP prefix or
        # DeepSpeed tag); resuming from it with two more steps continues the same run.
        _launch(tmp_path, *overrides, "train.steps=7")
        straight = local_reference(load_config(None, [f"run.dir={tmp_path}", *overrides, "train.steps=7"]))
        got = [r["loss"] for r in _records(run / "stages" / "stage1" / "metrics.jsonl")]
        assert got == pytest.approx(straight["losses"][1], rel=1e-4)

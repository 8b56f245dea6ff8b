"""A checkpoint written at one world size resumes at another.

DDP and FSDP2, 2 -> 1 and 1 -> 2 ranks: torch.distributed.checkpoint reshards the model and
optimizer, and the data position is global (a step's global batch does not depend on the world
size), so the resumed run trains on the same examples — checked on the logged sample ids — and logs
the losses of the run it continues (1e-5 relative: 1 and 2 ranks reduce in different float orders).

A checkpoint of another layout (here: a 2-stage pipeline's, resumed end to end) is refused with one
line naming both layouts and the way out, instead of failing deep inside DCP as "corrupt".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import assert_user_error, clean_env, config_file, forked_cli, forked_run
from tiers import fast_first

YAML = """\
run: {name: e}
model: {name: mlp, n_layer: 2, width: 32}
data: {name: digits}
train: {batch_size: 16, steps: 6, log_every: 1, eval_every: 0, eval_batches: 1}
optim: {name: adamw, lr: 3.0e-3, warmup_steps: 2}
checkpoint: {every: 3, keep: 2}
runtime: {threads: 1}
telemetry: {progress: "off", tensorboard: false, sample_ids: true}
"""
REL = 1e-5


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return config_file(tmp_path_factory, YAML)


def _launch(config: Path, run_dir: Path, nproc: int, *overrides: str) -> None:
    forked_run([str(config), f"run.dir={run_dir}", *overrides], run_dir, nproc=nproc, timeout=240)


def _rows(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def _batch_ids(run: Path, nproc: int) -> dict[int, list[int]]:
    """step -> the global batch's example ids, in rank order."""
    per_rank = [_rows(run / "samples" / f"rank{r}" / "metrics.jsonl") for r in range(nproc)]
    return {s: [i for rows in per_rank for i in rows[s]["ids"]] for s in per_rank[0]}


@pytest.mark.parametrize("backend", fast_first("ddp", "fsdp"))
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_at_another_world_size(config: Path, tmp_path: Path, backend: str, before: int, after: int) -> None:
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    _launch(config, first, before, f"parallel.backend={backend}")
    step3 = first / "e" / "checkpoints" / "step-3"
    assert json.loads((step3 / "COMMITTED").read_text())["world_size"] == before
    _launch(config, resumed, after, f"parallel.backend={backend}", f"checkpoint.resume={step3}")

    got, want = _rows(resumed / "e" / "metrics.jsonl"), _rows(first / "e" / "metrics.jsonl")
    assert sorted(got) == [4, 5, 6]
    for step in got:
        a, b = got[step]["loss"], want[step]["loss"]
        assert abs(a - b) <= REL * abs(b), (step, a, b)
    ids_got, ids_want = _batch_ids(resumed / "e", after), _batch_ids(first / "e", before)
    assert all(ids_got[s] == ids_want[s] for s in (4, 5, 6)), "the resumed run trained on other examples"
    prov = json.loads((resumed / "e" / "provenance.json").read_text())
    assert prov["extra"]["world_size"] == after and prov["extra"]["resumed_from"] == str(step3)


@pytest.mark.slow
def test_checkpoint_of_another_layout_is_refused_by_name(config: Path, tmp_path: Path) -> None:
    pipe = tmp_path / "pipe"
    _launch(config, pipe, 2, "parallel.stages=2", "model.n_layer=4", "train.steps=3")
    step3 = pipe / "e" / "checkpoints" / "step-3"
    proc = forked_cli(["run", str(config), "parallel.backend=none", "model.n_layer=4", f"run.dir={tmp_path / 'bp'}",
                       f"checkpoint.resume={step3}"], tmp_path, env=clean_env(OMP_NUM_THREADS="1"))
    assert_user_error(proc, str(step3), "parallel.stages=2 cut at blocks [2], dcp format",
                      "parallel.stages=1, dcp format", "checkpoint.resume=never")
    assert not (tmp_path / "bp").exists()

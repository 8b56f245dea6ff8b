"""Overlapped data loading (`data.prefetch`): the next step's batch is made on a background thread
while the current step runs, and the wait for data is logged.

- Prefetching changes no number: a run with it logs bit-identical losses (and trains on the same
  example ids) as a run without it, on one process (micro-batches; DP-SGD's Poisson batches) and on
  2 ranks under DP-SGD with FSDP2 (the lock-step split reads the sampler's position), resumed from a
  checkpoint (the checkpoint holds the consumed data position, not the prefetched one).
- `data_wait_s` / `data_wait_frac` are in metrics.jsonl and TensorBoard, and the quickstart (2 ranks,
  as `make demo` runs it, fewer steps) waits for data less than 5% of its step time.
- The thread never outlives the loop: it ends with the run, and when the step or the batch fails.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import forked_run

from dist_train.config import load_config
from dist_train.data.sampler import StepSampler
from dist_train.train.batches import THREAD_NAME, StepBatches
from dist_train.train.hooks import Hooks

DP = ["optim.name=dp_sgd", "optim.lr=0.05", "privacy.max_physical_batch=3", "train.batch_size=16",
      "privacy.noise_multiplier=1.0", "parallel.backend=fsdp"]  # (in one process: all but the backend)
COMMON = ["optim.schedule=constant", "telemetry.sample_ids=true", "checkpoint.every=0", "checkpoint.at_end=false"]


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


def _eventually(check, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _ids(run: Path) -> dict[tuple[int, int], list]:
    """(rank, step) -> the example ids that rank trained on at that step."""
    out = {}
    for log in sorted((run / "samples").glob("rank*/metrics.jsonl")):
        rank = int(log.parent.name.removeprefix("rank"))
        for line in log.read_text().splitlines():
            row = json.loads(line)
            out[rank, row["step"]] = row["ids"]
    return out


# ------------------------------------------------------------------------ the batches themselves


class _Data:
    """Examples 0..99; a batch's inputs are its indices."""

    sampling = "epochs"

    def sampler(self, split, seed, batch):
        return StepSampler(100, batch, seed, self.sampling)

    def get_batch(self, split, idx):
        return idx.clone(), idx.clone()


class _Split:
    def micro_batches(self, idx):
        return list(idx.chunk(2))


def test_prefetched_batches_are_the_same_and_the_position_is_the_consumed_one():
    data = _Data()
    plain = StepBatches(data, _Split(), data.sampler("train", 0, 8), torch.device("cpu"), 1, 2, steps=4)
    ahead = StepBatches(data, _Split(), data.sampler("train", 0, 8), torch.device("cpu"), 1, 2, steps=4,
                        prefetch=True)
    with plain, ahead:
        for step in range(4):
            a, b = plain.next(step), ahead.next(step)
            assert torch.equal(a.indices, b.indices) and len(a.parts) == len(b.parts) == 2
            for (xa, _), (xb, _), part in zip(a.inputs, b.inputs, b.parts):
                assert torch.equal(xa, xb) and torch.equal(xb, part)
            assert ahead.state_dict() == plain.state_dict() == {"seed": 0, "global_batch": 8, "step": step + 1}
            if step < 3:  # one step ahead (drawn on the thread, soon), never past the last
                assert _eventually(lambda: ahead.sampler.step == step + 2)
        assert ahead.sampler.step == 4 and b.wait_s >= 0
    assert not _prefetch_threads()
    # Restoring a position drops the batch in the making and draws from there.
    with StepBatches(data, _Split(), data.sampler("train", 0, 8), torch.device("cpu"), 0, 1, steps=9,
                     prefetch=True) as again:
        again.next(0)
        again.load_state_dict({"seed": 0, "global_batch": 8, "step": 3})
        assert again.sampler.step == 3 and torch.equal(again.next(3).indices, data.sampler("train", 0, 8).global_indices(3))
    assert not _prefetch_threads()


# ------------------------------------------------------------------------ same numbers


def _in_process(run_dir: Path, name: str, *overrides: str, hooks=None, data=None) -> list[dict]:
    """`train` in this process, backend none: cheaper than a forked rank for a one-process run."""
    from dist_train.data import build_dataset
    from dist_train.runtime import discover, init_distributed
    from dist_train.train.loop import train

    cfg = load_config("quickstart.yaml", ["model.n_layer=1", "model.width=32", "model.n_head=2", "model.block_size=16",
                                          "data.max_bytes=100000", "train.batch_size=8", "train.log_every=1",
                                          "train.eval_batches=1", "train.sample_tokens=0", "runtime.threads=1",
                                          "parallel.stages=1", "parallel.backend=none",
                                          *COMMON, "telemetry.tensorboard=false", 'telemetry.progress="off"',
                                          f"run.dir={run_dir}", f"run.name={name}", *overrides])
    data = data(build_dataset(cfg.data, cfg.model.block_size)) if data else None
    threads = torch.get_num_threads()
    ctx = init_distributed(cfg, discover({}))
    try:
        train(cfg, ctx, ["pytest"], data=data, hooks=hooks)
    finally:
        ctx.destroy()
        torch.set_num_threads(threads)  # runtime.threads set this process's: the next test's as it was
    return [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [["train.grad_accum=2"], DP[:-1]], ids=["micro-batches", "dp_sgd"])
def test_one_process_prefetched_equals_not(tmp_path, extra):
    off = _in_process(tmp_path, "off", *extra, "train.steps=4", "data.prefetch=false")
    on = _in_process(tmp_path, "on", *extra, "train.steps=4", "data.prefetch=true")
    for key in ("loss", "grad_norm", *(["dp_examples", "epsilon"] if "dp_sgd" in str(extra) else [])):
        assert [r[key] for r in on] == [r[key] for r in off], key
    assert _ids(tmp_path / "on") == _ids(tmp_path / "off") and len(_ids(tmp_path / "on")) == 4
    assert not _prefetch_threads()


@pytest.mark.slow
def test_two_ranks_dp_sgd_resumed_prefetched_equals_not(dt, tmp_path):
    """Without prefetching, 4 steps straight; with it, 2 steps, checkpointed, then resumed to 4."""
    args = [*dt.TINY_GPT, *COMMON, *DP]
    off = dt.forked(tmp_path / "off", "r", *args, "data.prefetch=false", steps=4)
    dt.forked(tmp_path / "on", "r", *args, "checkpoint.at_end=true", steps=2)
    on = dt.forked(tmp_path / "on", "r", *args, steps=4)
    assert [r["step"] for r in on] == list(range(1, 5))
    assert len({r["dp_examples"] for r in off}) > 1, "Poisson batches should vary in size"
    for key in ("loss", "grad_norm", "dp_examples", "epsilon"):
        assert [r[key] for r in on] == [r[key] for r in off], key
    ids_on, ids_off = _ids(tmp_path / "on" / "r"), _ids(tmp_path / "off" / "r")
    assert ids_on == ids_off and {rank for rank, _ in ids_on} == {0, 1}


# ------------------------------------------------------------------------ the data wait


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    """The quickstart as `make demo` runs it (2 ranks, a 2-stage pipeline), 20 steps: two windows."""
    root = tmp_path_factory.mktemp("quickstart")
    forked_run(["quickstart.yaml", f"run.dir={root}", "run.name=q", "train.steps=20", "train.sample_tokens=0",
                "checkpoint.at_end=false", 'telemetry.progress="off"'], root, nproc=2)
    return root / "q"


def test_quickstart_waits_for_data_under_5_percent(quickstart):
    rows = [json.loads(line) for line in (quickstart / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    for row in rows:
        assert 0 <= row["data_wait_frac"] < 0.05, row
        assert row["data_wait_s"] >= 0
    for stage in (0, 1):  # each stage's own log has its figures
        for row in map(json.loads, (quickstart / "stages" / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()):
            assert 0 <= row["data_wait_frac"] < 0.05 and row["data_wait_s"] >= 0


def test_the_data_wait_is_in_tensorboard(quickstart):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(quickstart / "tb"))
    acc.Reload()
    assert {"perf/data_wait_s", "perf/data_wait_frac"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("perf/data_wait_frac")] == [10, 20]


# ------------------------------------------------------------------------ the thread's end


class _Boom(Exception):
    pass


class _FailingData:
    """The data set, except that reading the training batch of call `fail_at` raises."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.info, self.sampling = inner.info, inner.sampling

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_batch(self, split, idx):
        if split == "train":
            self.calls += 1
            if self.calls == self.fail_at:
                raise _Boom("the batch could not be read")
        return self.inner.get_batch(split, idx)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["step", "batch"])
def test_the_thread_ends_when_the_step_or_the_batch_fails(tmp_path, where):
    hooks, data = Hooks(), None
    if where == "step":  # fails after step 1, while step 2's batch is in the making
        def on_step(done):
            if done == 2:
                raise _Boom("the step failed")
        hooks.on_step = on_step
    else:  # step 2's batch fails on the thread: raised in the loop when the step asks for it
        data = lambda inner: _FailingData(inner, fail_at=3)  # noqa: E731
    with pytest.raises(_Boom):
        _in_process(tmp_path, "r", "train.steps=6", hooks=hooks, data=data)
    assert not _prefetch_threads()

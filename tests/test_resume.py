"""Resume on 2 gloo ranks: a run of 20 steps and a run of 10 steps resumed to 20 log the same losses
for steps 11-20 (same seed; DDP, FSDP2, DeepSpeed ZeRO-2, FairScale OSS).

Per backend, three launches (shared by the tests below through a module-scoped fixture):
  A  20 steps straight, no checkpoint.
  B1 10 steps into its own run dir, checkpoint every 2 steps keeping 2 -> step-8 and step-10 remain.
     Then a fake, newer, *uncommitted* folder step-99 (no COMMITTED marker) is planted.
  B2 the same run name/dir relaunched with train.steps=20 and checkpoint.resume=auto (the default):
     it must resume from step-10 (ignoring step-99) and continue the metrics file.

The learning-rate schedule is `constant` after a 2-step warm-up: the cosine schedule is a function
of train.steps, so B1 (steps=10) would otherwise decay on a different horizon than A (steps=20) and
steps 1-10 would not be the same training at all. There is no "stop early" option to make B1 a
prefix of a 20-step cosine run, so a schedule that does not depend on the horizon is the way.

Tolerance for steps 11-20: 1e-5 relative. A resumed run redoes exactly the arithmetic of the straight
run (same weights, optimizer moments and step count restored bit for bit, same batches recomputed
from (seed, step)), so the values are expected to be identical; 1e-5 only leaves room for benign
nondeterminism (e.g. reduction order of a collective), while a lost optimizer state, a reset
AdamW step count or a data position off by one step changes the step-11 loss by >1e-3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiers import fast_first

RTOL = 1e-5
STEPS, HALF = 20, 10
RESUME_CFG = ["optim.schedule=constant"]

BACKENDS = {
    "ddp": ["parallel.backend=ddp"],
    "fsdp": ["parallel.backend=fsdp"],
    "deepspeed-zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
    "fairscale": ["parallel.backend=fairscale"],
}


@dataclass
class ResumeRuns:
    straight: list[dict]  # A
    first_leg: list[dict]  # B1's metrics.jsonl as it was after B1
    resumed: list[dict]  # B's metrics.jsonl after B2
    checkpoints_after_first_leg: dict[str, list[str]]  # step-N folder -> its files
    run_dir: Path  # B's run directory


@pytest.fixture(scope="module", params=fast_first(*BACKENDS))
def runs(request, dt, tmp_path_factory) -> ResumeRuns:
    backend = BACKENDS[request.param]
    cfg = [*dt.TINY_GPT, *RESUME_CFG, *backend]
    root = tmp_path_factory.mktemp(f"resume-{request.param}")

    straight = dt.forked(root / "a", "run", *cfg, "checkpoint.every=0", "checkpoint.at_end=false", steps=STEPS)

    b_dir = root / "b"
    first_leg = dt.forked(b_dir, "run", *cfg, "checkpoint.every=2", "checkpoint.keep=2", steps=HALF)
    ckpt_root = b_dir / "run" / "checkpoints"
    listing = {p.name: sorted(f.name for f in p.iterdir()) for p in ckpt_root.iterdir()}

    fake = ckpt_root / "step-99"  # an interrupted save: newer than any real one, but no marker
    fake.mkdir()
    (fake / "trainer_rank0.pt").write_bytes(b"not a checkpoint")

    # Leg 2 saves nothing, so the checkpoint folder still shows what resume had to choose from.
    resumed = dt.forked(b_dir, "run", *cfg, "checkpoint.every=0", "checkpoint.at_end=false", steps=STEPS)
    return ResumeRuns(straight, first_leg, resumed, listing, b_dir / "run")


def _assert_close(got: dict, ref: dict, key: str, rtol: float = RTOL) -> None:
    assert got[key] == pytest.approx(ref[key], rel=rtol), f"step {ref['step']}: {key} {got[key]} vs {ref[key]}"


def test_resumed_run_logs_same_losses_as_straight_run(runs: ResumeRuns) -> None:
    straight = {r["step"]: r for r in runs.straight}
    resumed = {r["step"]: r for r in runs.resumed}
    for step in range(HALF + 1, STEPS + 1):
        assert resumed[step]["lr"] == straight[step]["lr"], f"step {step}: lr"
        _assert_close(resumed[step], straight[step], "loss")
        _assert_close(resumed[step], straight[step], "grad_norm")
    _assert_close(resumed[STEPS], straight[STEPS], "val_loss")
    # And the first leg was the same training as the straight run's first half.
    for r in runs.first_leg:
        _assert_close(r, straight[r["step"]], "loss")
    # Not vacuous: consecutive steps of one run differ by far more than RTOL, so a data position or
    # optimizer state off by one step could not pass the comparison above.
    shifted = [abs(straight[s + 1]["loss"] - straight[s]["loss"]) / straight[s]["loss"] for s in range(HALF, STEPS)]
    assert min(shifted) > 100 * RTOL, shifted


def test_resumed_metrics_have_each_step_once(runs: ResumeRuns) -> None:
    assert [r["step"] for r in runs.first_leg] == list(range(1, HALF + 1))
    assert [r["step"] for r in runs.resumed] == list(range(1, STEPS + 1))
    # Lines of the first leg are kept as they were, not rewritten.
    assert runs.resumed[:HALF] == runs.first_leg


def test_keep_last_k_committed_checkpoints(runs: ResumeRuns) -> None:
    """checkpoint.every=2, keep=2 over 10 steps: saves at 2,4,6,8,10; only the 2 newest remain."""
    assert sorted(runs.checkpoints_after_first_leg) == ["step-10", "step-8"]
    for name, files in runs.checkpoints_after_first_leg.items():
        assert "COMMITTED" in files, f"{name} has no COMMITTED marker: {files}"
        assert not any(f.endswith(".tmp") for f in files), f"{name}: leftover temp file {files}"
    marker = json.loads((runs.run_dir / "checkpoints" / "step-10" / "COMMITTED").read_text())
    assert marker["step"] == 10 and marker["world_size"] == 2


def test_resume_auto_ignores_uncommitted_folder(runs: ResumeRuns) -> None:
    """The newer step-99 without marker must not be chosen: B2 resumed from step-10 (and did not
    fail trying to read step-99, which it would have if it had picked it)."""
    provenance = json.loads((runs.run_dir / "provenance.json").read_text())
    resumed_from = provenance["extra"]["resumed_from"]
    assert resumed_from is not None, provenance["extra"]
    assert Path(resumed_from).name == "step-10"
    assert (runs.run_dir / "checkpoints" / "step-99").is_dir()  # left alone: newer than any commit

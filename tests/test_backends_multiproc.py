"""Every data-parallel backend, run for real on 2 gloo ranks, reproduces the single-process run.

Same seed, config and global batch: the two ranks see the two halves of the single process's batch,
and a correct backend averages their gradients into exactly the single-process gradient. So per step
the logged loss (mean of the two half-batch means = the full-batch mean) and the pre-clip global
gradient norm must match the `parallel.backend=none` run, and so must the final validation loss.

Tolerances (relative):
  loss, val_loss  1e-4 -- float32 sums in a different order (all-reduce of two half-batch gradients
                  vs one full-batch backward) drift the weights by ~1e-7 relative per step; over 6
                  AdamW steps the observed loss difference is ~1e-7, so 1e-4 leaves wide margin while
                  any real bug (a missing average, a wrong shard, a skipped micro-batch) moves the
                  loss by 1e-3 or more from step 2 on.
  grad_norm       1e-3 -- a norm of gradients is more sensitive to the same reduction-order noise
                  (observed ~1e-6); a wrong gradient scale (e.g. sum instead of mean) is a factor 2.
The negative control at the end shows that this comparison does fail on a genuinely different run.
"""

from __future__ import annotations

import math

import pytest
from tiers import fast_first, slow

STEPS = 6
# No checkpoint: these tests are about the arithmetic of a step, and saving costs seconds.
NO_CKPT = ["checkpoint.every=0", "checkpoint.at_end=false"]
DIGITS = ["model.name=mlp", "data.name=digits", "model.width=32", "model.n_layer=2", "train.batch_size=8",
          "train.log_every=1", "optim.warmup_steps=2", "train.eval_batches=1", "telemetry.tensorboard=false",
          "checkpoint.every=0", "checkpoint.at_end=false"]

LOSS_RTOL = 1e-4
GRAD_NORM_RTOL = 1e-3


def assert_same_run(got: list[dict], ref: list[dict], steps: int = STEPS) -> None:
    """Per step: same lr, loss and grad_norm within tolerance; final val_loss within tolerance."""
    assert [r["step"] for r in ref] == list(range(1, steps + 1)), "reference did not log every step"
    assert [r["step"] for r in got] == [r["step"] for r in ref], "logged steps differ"
    for g, r in zip(got, ref):
        s = r["step"]
        assert g["lr"] == pytest.approx(r["lr"], rel=1e-12), f"step {s}: lr"
        assert math.isfinite(g["loss"]) and math.isfinite(g["grad_norm"]), f"step {s}: non-finite {g}"
        assert g["loss"] == pytest.approx(r["loss"], rel=LOSS_RTOL), f"step {s}: loss {g['loss']} vs {r['loss']}"
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=GRAD_NORM_RTOL), \
            f"step {s}: grad_norm {g['grad_norm']} vs {r['grad_norm']}"
    assert "val_loss" in ref[-1] and "val_loss" in got[-1], "final step has no val_loss"
    assert got[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=LOSS_RTOL), "final val_loss"


@pytest.fixture(scope="module")
def gpt_reference(dt, tmp_path_factory) -> list[dict]:
    """Single process, whole global batch of 8 per step: the run every backend must reproduce."""
    return dt.run(tmp_path_factory.mktemp("ref-gpt"), "single", *dt.TINY_GPT, *NO_CKPT, steps=STEPS)


@pytest.fixture(scope="module")
def digits_reference(dt, tmp_path_factory) -> list[dict]:
    return dt.run(tmp_path_factory.mktemp("ref-digits"), "single", *DIGITS, steps=STEPS)


BACKENDS = {
    "ddp": ["parallel.backend=ddp"],
    "fsdp": ["parallel.backend=fsdp"],
    "deepspeed-zero1": ["parallel.backend=deepspeed", "parallel.zero_stage=1"],
    "deepspeed-zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
    "deepspeed-zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
    "fairscale": ["parallel.backend=fairscale"],
}
FAST = {"ddp", "fsdp", "deepspeed-zero2", "fairscale"}  # the fast tier's backends: one per ZeRO family


@pytest.mark.parametrize("backend", [b if b in FAST else slow(b) for b in BACKENDS])
def test_two_ranks_match_single_process(dt, tmp_path, gpt_reference, backend):
    # An extensions folder of its own: on CPU, DeepSpeed would JIT-compile its inference-only
    # shared-memory all-reduce there (~25 s); the backend declines it, so the folder stays empty.
    extensions = tmp_path / "torch_extensions"
    got = dt.forked(tmp_path, backend, *dt.TINY_GPT, *NO_CKPT, *BACKENDS[backend], steps=STEPS,
                    env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert_same_run(got, gpt_reference)
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(extensions.rglob("*"))


# Accumulation: 2 ranks x 2 micro-batches of 2 = the same global batch of 8. Gradients of the first
# micro-batch stay local (no_sync / no reduce-scatter / DeepSpeed's non-boundary step) and the loss is
# scaled by 1/grad_accum, so the optimizer step must equal the single-process one (same tolerances).
@pytest.mark.parametrize("backend", fast_first("ddp", "fsdp", "deepspeed-zero2"))
def test_grad_accum_matches_single_process_without_accum(dt, tmp_path, gpt_reference, backend):
    got = dt.forked(tmp_path, backend, *dt.TINY_GPT, *NO_CKPT, *BACKENDS[backend], "train.grad_accum=2", steps=STEPS)
    assert_same_run(got, gpt_reference)


def test_mlp_digits_ddp_matches_single_process(dt, tmp_path, digits_reference):
    """The classification path (epoch-permutation sampler, MLP, accuracy metric) on DDP."""
    got = dt.forked(tmp_path, "ddp", *DIGITS, "parallel.backend=ddp", steps=STEPS)
    assert_same_run(got, digits_reference)
    assert got[-1]["val_acc"] == pytest.approx(digits_reference[-1]["val_acc"], abs=1e-6)


def test_negative_control_other_seed_does_not_match(dt, tmp_path, gpt_reference):
    """The comparison is not vacuous: a 2-rank run with another seed (other init, other batches)
    must fail it, and its losses must differ by far more than the tolerance."""
    got = dt.forked(tmp_path, "ddp-seed1", *dt.TINY_GPT, *NO_CKPT, "parallel.backend=ddp", "train.seed=1", steps=STEPS)
    with pytest.raises(AssertionError):
        assert_same_run(got, gpt_reference)
    diffs = [abs(g["loss"] - r["loss"]) / abs(r["loss"]) for g, r in zip(got, gpt_reference)]
    assert max(diffs) > 100 * LOSS_RTOL, diffs

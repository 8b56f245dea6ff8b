"""The local-learning pipeline on real ranks: a 2-stage run on 2 gloo processes against the same
stages trained one after the other in a single process, plus the isolation property (only
detached activations and targets cross ranks) and plan-time errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import forked_cli, forked_run
from dist_train.config import load_config
from dist_train.train.local_reference import local_reference

TINY = ["model.n_layer=4", "model.width=32", "model.n_head=2", "model.block_size=16", "data.max_bytes=200000",
        "train.batch_size=8", "train.steps=6", "train.log_every=1", "train.eval_batches=2",
        "optim.warmup_steps=2", "checkpoint.at_end=false", "parallel.stages=2",
        "train.sample_tokens=0",  # the quickstart generates 200 tokens through the stages after training
        "local.send_targets=true"]  # the general contract (the quickstart keeps targets off the wire)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _reference(overrides: list[str]) -> list[list[float]]:
    """Both stages in one process, sequentially: what the pipeline must compute, step for step."""
    return local_reference(load_config(None, overrides))["losses"]


def _launch(tmp: Path, *overrides: str) -> Path:
    forked_run(["quickstart.yaml", f"run.dir={tmp}", "run.name=pipe", *overrides], tmp, nproc=2, timeout=240)
    return tmp / "pipe"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return _launch(tmp_path_factory.mktemp("pipe"), *TINY)


def test_two_stage_pipeline_matches_sequential_reference(pipeline):
    ref = _reference([f"run.dir={pipeline.parent}", *TINY])
    for k in range(2):
        got = [r["loss"] for r in _records(pipeline / "stages" / f"stage{k}" / "metrics.jsonl")]
        # Same arithmetic in the same order on one thread each: only float32 kernel-level noise.
        assert got == pytest.approx(ref[k], rel=1e-5), f"stage {k}"
    # Not vacuous: the local loss of stage 0 and the task loss of stage 1 really move.
    assert ref[0][0] != pytest.approx(ref[0][-1], rel=1e-3) and ref[1][0] != pytest.approx(ref[1][-1], rel=1e-3)


MLP = ["model.name=mlp", "data.name=digits", "model.width=32"]
CNN = ["model.name=cnn", "data.name=digits", "model.width=16"]


def _tiny(extra: list[str]) -> list[str]:
    """TINY for a run with `extra`: the byte corpus' cap and the GPT's heads go when the run reads
    digits with another model instead (a key the chosen model or data set does not read is an error)."""
    gpt_only = ("data.max_bytes=", "model.n_head=")
    return [o for o in TINY if not (o.startswith(gpt_only) and "data.name=digits" in extra)]


@pytest.mark.parametrize("extra", [
    ["local.method=mono_forward"], ["local.method=infopro"], ["local.method=auglocal"], ["local.method=tpsgd"],
    ["local.method=man"], [*MLP, "local.method=dgl"], [*MLP, "local.method=infopro"],
    [*MLP, "local.method=forward_forward"], [*CNN, "local.method=forward_forward"], [*CNN, "local.method=dgl"],
], ids=["mono_forward", "infopro", "auglocal", "tpsgd", "man", "mlp-dgl", "mlp-infopro", "mlp-ff", "cnn-ff",
        "cnn-dgl"])
def test_methods_in_the_pipeline_match_the_reference(tmp_path, extra):
    overrides = [*_tiny(extra), "train.steps=4", *extra]
    run = _launch(tmp_path, *overrides)
    ref = _reference([f"run.dir={tmp_path}", *overrides])
    for k in range(2):
        got = [r["loss"] for r in _records(run / "stages" / f"stage{k}" / "metrics.jsonl")]
        assert got == pytest.approx(ref[k], rel=1e-5), f"stage {k}"


@pytest.mark.parametrize("method", ["dgl", "infopro", "auglocal", "man", "forward_forward", "tpsgd", "mono_forward"])
def test_stage_messages_carry_no_autograd_state(method):
    """Every method's stage hands on a message with no graph, and the next stage's loss gives the
    previous stage's parameters no gradient (what makes the stages independent on any rank)."""
    import torch

    from dist_train.local.build import build_stage
    from dist_train.data import build_dataset
    from dist_train.local.layout import stage_layout

    cfg = load_config(None, [*MLP, "model.n_layer=4", "parallel.stages=2", f"local.method={method}",
                             "parallel.backend=none"])
    data = build_dataset(cfg.data, cfg.model.block_size)
    first, _ = build_stage(cfg, data.info, stage_layout(0, 2, 2))
    second, _ = build_stage(cfg, data.info, stage_layout(1, 2, 2))
    x, y = data.get_batch("train", torch.arange(8))
    sent: list = []
    first(x=x, y=y, on_activation=sent.append)
    (message,) = sent
    assert message.grad_fn is None and not message.requires_grad
    second(x=x if second.reads_data else None, received=message, y=y).backward()
    assert all(p.grad is None for p in first.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in second.parameters())


def test_only_detached_activations_and_targets_cross(pipeline):
    s0 = _records(pipeline / "stages" / "stage0" / "metrics.jsonl")[-1]
    steps, batch, block, width = 6, 8, 16, 32
    # Per training step: one float32 activation [B, T, W] and one int64 [step] + targets [B, T];
    # nothing else, and nothing that carries autograd state.
    per_msg = batch * block * width * 4 + (1 + batch * block) * 8
    # (the last record is logged after step 6, before the evaluation traffic)
    assert s0["tensors_sent"] == 2 * steps
    assert s0["bytes_sent"] == per_msg * steps
    s1 = _records(pipeline / "stages" / "stage1" / "metrics.jsonl")[-1]
    assert s1["bytes_sent"] == 0  # the last stage sends nothing: no gradient goes back


def test_micro_batches_stream_and_give_the_whole_batch_update(tmp_path, pipeline):
    """train.grad_accum=2: each batch crosses as 2 micro-batches (twice the messages, same bytes),
    the stages accumulate, and the losses equal the reference's and, up to float32 summation order,
    the whole-batch run's. Evaluation midway (different message shapes) works alongside."""
    overrides = [*TINY, "train.grad_accum=2", "train.eval_every=3"]
    run = _launch(tmp_path, *overrides)
    ref = _reference([f"run.dir={tmp_path}", *overrides])
    whole = _records(pipeline / "stages" / "stage0" / "metrics.jsonl")[1]  # after step 2
    for k in range(2):
        recs = _records(run / "stages" / f"stage{k}" / "metrics.jsonl")
        got = [r["loss"] for r in recs]
        assert got == pytest.approx(ref[k], rel=1e-5), f"stage {k}"
        full = [r["loss"] for r in _records(pipeline / "stages" / f"stage{k}" / "metrics.jsonl")]
        assert got == pytest.approx(full, rel=1e-5), f"stage {k}"
    assert "val_loss" in _records(run / "stages" / "stage1" / "metrics.jsonl")[2]  # step 3
    s0 = _records(run / "stages" / "stage0" / "metrics.jsonl")[1]  # after step 2, before the evaluation
    # Same activations and targets, cut in two: one more 8-byte step header per step.
    assert s0["tensors_sent"] == 2 * whole["tensors_sent"] and s0["bytes_sent"] == whole["bytes_sent"] + 2 * 8


def test_targets_can_stay_off_the_wire(tmp_path, pipeline):
    """local.send_targets=false: every stage reads its own targets from the deterministic sampler,
    only the activation crosses (no targets, no step header), and training is unchanged."""
    run = _launch(tmp_path, *TINY, "local.send_targets=false")
    s0 = _records(run / "stages" / "stage0" / "metrics.jsonl")[-1]
    assert s0["tensors_sent"] == 6 and s0["bytes_sent"] == 6 * 8 * 16 * 32 * 4
    for k in range(2):
        a = [r["loss"] for r in _records(run / "stages" / f"stage{k}" / "metrics.jsonl")]
        b = [r["loss"] for r in _records(pipeline / "stages" / f"stage{k}" / "metrics.jsonl")]
        assert a == b, f"stage {k}"


def test_generation_runs_through_the_stages(tmp_path):
    """A sample generated through 2 ranks (the last stage returns each sampled byte to stage 0)
    equals the same stages chained in one process, byte for byte."""
    overrides = [*TINY, "train.sample_tokens=24", "train.sample_prompt=import"]
    run = _launch(tmp_path, *overrides)
    ref = local_reference(load_config(None, [f"run.dir={tmp_path}", *overrides]))
    text = (run / "sample.txt").read_text()
    assert text == "import" + ref["sample"] and len(ref["sample"]) > 0


@pytest.mark.parametrize("extra", [[], [*MLP], [*MLP, "local.noprop.steps=4", "local.noprop.learn_embedding=true"]],
                         ids=["gpt", "mlp", "mlp-T4-learned-U"])
def test_noprop_stages_train_without_traffic(tmp_path, extra):
    """NoProp: each stage reads (x, y) itself and denoises its own steps (T = K, or T = 4 over K = 2);
    not one activation crosses in training, the losses equal the sequential reference, and evaluation
    chains the stages. A learned label embedding costs only its own small all-reduce."""
    overrides = [*_tiny(extra), "local.method=noprop", *extra]
    run = _launch(tmp_path, *overrides)
    ref = local_reference(load_config(None, [f"run.dir={tmp_path}", *overrides]))
    for k in range(2):
        recs = _records(run / "stages" / f"stage{k}" / "metrics.jsonl")
        assert [r["loss"] for r in recs] == pytest.approx(ref["losses"][k], rel=1e-5), f"stage {k}"
        assert recs[-1]["bytes_sent"] == 0 and recs[-1]["tensors_sent"] == 0
        if "local.noprop.learn_embedding=true" in extra:  # 2 all-reduces of U [10, 32] fp32 per step
            assert recs[-1]["embedding_sync_bytes"] == 6 * 2 * (10 * 32 * 4)  # ring factor 2(N-1)/N = 1
    main = _records(run / "metrics.jsonl")[-1]
    assert main["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)
    if extra:
        assert main["val_acc"] == pytest.approx(ref["val_acc"], abs=1e-6)


def test_pipeline_run_dir(pipeline):
    """The run-dir contract holds for pipelines: one top-level row per logged step, whose loss is the
    last stage's task loss, with every stage's loss, throughput, memory and the energy fields."""
    main = _records(pipeline / "metrics.jsonl")
    stages = [_records(pipeline / "stages" / f"stage{k}" / "metrics.jsonl") for k in range(2)]
    assert [r["step"] for r in main] == list(range(1, 7))
    for row, s0, s1 in zip(main, *stages):
        assert row["loss"] == s1["loss"] and row["stage0_loss"] == s0["loss"] and row["stage1_loss"] == s1["loss"]
        assert row["samples_per_s"] == min(s0["samples_per_s"], s1["samples_per_s"]) > 0
        assert row["peak_mem_bytes"] == max(s0["peak_mem_bytes"], s1["peak_mem_bytes"]) > 0
        assert {"lr", "tokens_per_s", "energy_j", "power_w", "energy_source"} <= row.keys()
    assert "val_loss" in main[-1] and main[-1]["val_loss"] > 0 and "val_loss" not in main[0]
    assert (pipeline / "config.yaml").is_file() and (pipeline / "provenance.json").is_file()


def test_evaluation_is_independent_of_logging(tmp_path):
    """train.eval_every need not be a multiple of train.log_every: every evaluation gets its row."""
    run = _launch(tmp_path, *TINY, "train.log_every=4", "train.eval_every=3")
    main = _records(run / "metrics.jsonl")
    assert [r["step"] for r in main] == [3, 4, 6]
    assert ["val_loss" in r for r in main] == [True, False, True]


@pytest.mark.slow
def test_four_stages_middle_stages_receive_and_send(tmp_path):
    """K = 4 on 4 ranks: the two middle stages both receive and send; every stage's losses equal the
    sequential reference's."""
    overrides = [*TINY, "parallel.stages=4", "train.steps=4"]
    forked_run(["quickstart.yaml", f"run.dir={tmp_path}", "run.name=pipe4", *overrides], tmp_path, nproc=4, timeout=240)
    ref = _reference([f"run.dir={tmp_path}", *overrides])
    act_bytes = 8 * 16 * 32 * 4  # one float32 [8, 16, 32] activation
    for k in range(4):
        recs = _records(tmp_path / "pipe4" / "stages" / f"stage{k}" / "metrics.jsonl")
        assert [r["loss"] for r in recs] == pytest.approx(ref[k], rel=1e-5), f"stage {k}"
        # Stages 0-2 each send 4 activations (plus targets and a step header); the last sends nothing.
        sent = recs[-1]["bytes_sent"]
        assert (sent > 4 * act_bytes) if k < 3 else sent == 0, (k, sent)
    main = _records(tmp_path / "pipe4" / "metrics.jsonl")
    assert {f"stage{k}_loss" for k in range(4)} <= main[-1].keys()


@pytest.mark.parametrize("overrides, nproc, words", [
    (["parallel.stages=5"], 2, ["parallel.stages", "blocks"]),       # more stages than blocks
    (["parallel.stages=2"], 3, ["parallel.stages", "divide"]),        # K does not divide the world
    (["parallel.stages=2", "local.method=noprop", "local.asynchronous=true"], 2, ["local.asynchronous"]),
    (["parallel.stages=2", "local.method=man", "parallel.backend=fsdp"], 4, ["local.method", "man"]),
    (["parallel.stages=2", "parallel.backend=fairscale"], 4, ["parallel.backend"]),
    (["parallel.stages=2", "parallel.cut_points=[1,2]"], 2, ["parallel.cut_points"]),
])
def test_plan_rejects_impossible_pipelines(tmp_path, overrides, nproc, words):
    proc = forked_cli(["plan", "quickstart.yaml", "--nproc", str(nproc), f"run.dir={tmp_path}", "train.batch_size=12",
                       *overrides], tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("overrides, words", [
    (["parallel.backend=fsdp"], ["stage=2 x dp=2", "fsdp inside each stage", "aux head", "activations forward"]),
    (["local.method=noprop"], ["1 x (own embed + blocks 0-1 + denoiser)", "no activations in training"]),
    (["local.method=noprop", "local.noprop.steps=4"], ["2 x (own embed + blocks 0-1 + denoiser)"]),
])
def test_plan_shows_the_stage_layout(tmp_path, overrides, words):
    proc = forked_cli(["plan", "quickstart.yaml", "--nproc", "4", f"run.dir={tmp_path}", *overrides], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all(w in proc.stdout for w in words), proc.stdout


@pytest.mark.slow
def test_pipeline_resume_is_exact(tmp_path):
    """6 steps straight vs 3 steps, stop, resume to 6: every stage logs the same losses for 4-6.
    (Constant lr after warm-up, so the schedule does not depend on train.steps.)"""
    common = [*TINY, "optim.schedule=constant", "checkpoint.every=0", "checkpoint.at_end=true"]
    straight = _launch(tmp_path / "a", *common)
    _launch(tmp_path / "b", *common, "train.steps=3")
    resumed = _launch(tmp_path / "b", *common)
    for k in range(2):
        a = _records(straight / "stages" / f"stage{k}" / "metrics.jsonl")
        b = _records(resumed / "stages" / f"stage{k}" / "metrics.jsonl")
        assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # no duplicated lines after resume
        assert [r["loss"] for r in b[3:]] == pytest.approx([r["loss"] for r in a[3:]], rel=1e-6), f"stage {k}"
    marker = json.loads((resumed / "checkpoints" / "step-6" / "COMMITTED").read_text())
    assert marker["world_size"] == 2


@pytest.mark.slow
def test_asynchronous_mode_replays_instead_of_idling(tmp_path):
    """A heavy first stage (8 of 9 blocks) and a light second one: in asynchronous mode the second
    stage trains on replayed batches while it waits, within the reuse cap, and still consumes every
    activation the first stage sends."""
    # Wide enough that compute, not per-step overhead, sets each stage's pace (stage 0: 8 blocks and a
    # head, stage 1: 1 block and a head), so stage 1 waits every step even on a loaded machine.
    run = _launch(tmp_path, *TINY, "model.n_layer=9", "model.width=128", "model.block_size=64",
                  "parallel.cut_points=[8]", "train.steps=12",
                  "local.asynchronous=true", "local.replay_size=4", "local.max_reuse=3", "checkpoint.at_end=true")
    s1 = _records(run / "stages" / "stage1" / "metrics.jsonl")
    assert [r["step"] for r in s1] == list(range(1, 13))  # every upstream step consumed once, in order
    last = s1[-1]
    assert 0 < last["replays"] <= 12 * 2  # each batch: 1 fresh use + at most 2 replays
    # A replayed batch is one of the buffer's 4 consecutive upstream steps: at most 3 steps old.
    assert last["max_reuse_seen"] <= 3 and 0 <= last["mean_staleness"] <= 3
    assert "replays" not in _records(run / "stages" / "stage0" / "metrics.jsonl")[-1]  # stage 0 reads data
    # The replay buffer is part of the stage's checkpoint, and loads back as it was.
    import torch

    from dist_train.local.replay import ReplayBuffer

    saved = torch.load(run / "checkpoints" / "step-12" / "trainer_rank1.pt", weights_only=True)["replay"]
    assert len(saved["x"]) == 4 and saved["step"] == list(range(8, 12)) and saved["replays"] == last["replays"]
    assert last["mean_staleness"] == pytest.approx(saved["staleness_sum"] / saved["replays"])
    buf = ReplayBuffer(4, 3)
    buf.load_state_dict(saved, torch.device("cpu"))
    assert buf.state_dict()["uses"] == saved["uses"] and torch.equal(buf.entries[0].x, saved["x"][0])


def test_asynchronous_mode_needs_one_rank_per_stage(tmp_path):
    proc = forked_cli(["plan", "quickstart.yaml", "--nproc", "4", f"run.dir={tmp_path}", "parallel.stages=2",
                       "local.asynchronous=true"], tmp_path)
    assert proc.returncode == 2 and "local.asynchronous" in proc.stderr


def test_man_sends_weights_back_rarely_and_trains(tmp_path):
    """MAN: the second stage sends its first block's weights back every `local.man.every` steps (the one
    opt-in backward message: weights, never gradients); the first stage folds them into its EMA."""
    run = _launch(tmp_path, *TINY, "local.method=man", "local.man.every=2", "train.steps=6")
    s0 = _records(run / "stages" / "stage0" / "metrics.jsonl")
    s1 = _records(run / "stages" / "stage1" / "metrics.jsonl")
    block_params = 32 * 32 * 12 + 32 * 13  # one GPT block at width 32: attention + MLP + norms
    assert s1[-1]["weight_bytes_sent"] == 3 * block_params * 4  # steps 1, 3, 5: fp32 weights
    # Sent after steps 0, 2, 4; the message of step s is applied at the start of step s + 2
    # (local.man.delay), so stage 0 has folded in 0, 0, 1, 1, 2, 2 by the end of steps 1..6.
    assert [r["weight_msgs_received"] for r in s0] == [0, 0, 1, 1, 2, 2]
    assert s1[-1]["bytes_sent"] == 0  # no activations backward
    assert s0[-1]["loss"] < s0[0]["loss"]

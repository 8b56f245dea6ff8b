"""Faults injected into real multi-process runs, and what the run must do about each.

Every fault is real: a SIGKILL or SIGSTOP the kernel delivers, a SIGTERM to the launcher, a NaN in
the loss, a truncated file, a pickle that would run code. `DIST_TRAIN_FAULT` (dist_train/runtime/
faults.py) only chooses the step, so that each test can name what it expects to lose (nothing).

The runs are a digits MLP under DDP on 2 gloo ranks and the quickstart's own layout (a 2-stage
local-learning pipeline), small enough that one launch takes seconds. The interrupted runs are
compared with the same runs uninterrupted: same losses (1e-6 relative: the resumed run replays the
same float operations from the same state), and the same example ids per step, each exactly once
per epoch.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from cli_helpers import CLI, TORCHRUN, assert_user_error, clean_env, cli, config_file, forked_cli, forked_run
from tiers import fast_first

STEPS = 30
# 359 training images (val_fraction 0.8) in batches of 32: an epoch is 11.2 steps, so 30 steps
# cross two epoch boundaries, one of them inside a step.
DDP_YAML = """\
run: {name: r}
model: {name: mlp, n_layer: 2, width: 32}
data: {name: digits, val_fraction: 0.8}
train: {batch_size: 32, steps: 30, log_every: 5, eval_batches: 2}
optim: {name: adamw, lr: 3.0e-3, warmup_steps: 2}
checkpoint: {every: 10, keep: 2}
runtime: {threads: 1}
telemetry: {progress: "off", tensorboard: false, sample_ids: true}
"""
PIPELINE = ["parallel.stages=2", "model.n_layer=4", "local.method=dgl"]  # the quickstart's layout
TRAIN_EXAMPLES = 359
REL = 1e-6


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return config_file(tmp_path_factory, DDP_YAML)


def _launch(config: Path, work: Path, *overrides: str, fault: str = "", restarts: int = 0,
            timeout: float = 240) -> subprocess.CompletedProcess:
    env = clean_env(OMP_NUM_THREADS="1", **({"DIST_TRAIN_FAULT": fault} if fault else {}))
    argv = [*CLI, "launch", str(config), "--nproc", "2", "--max-restarts", str(restarts),
            f"run.dir={work / 'runs'}", *overrides]
    work.mkdir(parents=True, exist_ok=True)
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


def _forked(config: Path, work: Path, *overrides: str, nproc: int = 2, fault: str = "",
            run_dir: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """The ranks `_launch` starts (`nproc` gloo workers, one thread each; nproc 1: a plain `dist-train
    run`), forked from the fork server, without the agent and an interpreter start per rank: for the
    runs whose part in a test is what the ranks compute, not what the launcher does. Answers as
    `_launch` does, so that `_ok` judges it: exit 0 with rank 0's output, or 1 with every rank's."""
    argv = [str(config), f"run.dir={run_dir or work / 'runs'}", *overrides]
    try:
        out = forked_run(argv, work, nproc=nproc, env={"DIST_TRAIN_FAULT": fault} if fault else None, timeout=timeout)
    except pytest.fail.Exception as e:
        return subprocess.CompletedProcess(argv, 1, "", str(e))
    return subprocess.CompletedProcess(argv, 0, out, "")


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ids(run: Path, rank: int) -> dict[int, list[int]]:
    rows = _rows(run / "samples" / f"rank{rank}" / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"rank {rank}: a step logged twice or out of order: {steps}"
    return {r["step"]: r["ids"] for r in rows}


def _assert_each_example_once_per_epoch(order: list[int]) -> None:
    for start in range(0, len(order), TRAIN_EXAMPLES):
        epoch = order[start:start + TRAIN_EXAMPLES]
        assert len(set(epoch)) == len(epoch), f"an example repeats inside the epoch at position {start}"
        if len(epoch) == TRAIN_EXAMPLES:
            assert sorted(epoch) == list(range(TRAIN_EXAMPLES)), "a full epoch must cover every example"


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(1.0, abs(b))


# ------------------------------------------------------------------ 1. a worker SIGKILLed mid-run


@pytest.fixture(scope="module", params=["ddp", "pipeline"])
def killed(request, config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same run twice: uninterrupted (its 2 ranks forked: the reference is what the ranks compute),
    and with rank 1 SIGKILLed right after step 16's update (checkpoint at 10) under `launch
    --max-restarts 1`."""
    layout = PIPELINE if request.param == "pipeline" else []
    work = tmp_path_factory.mktemp(f"kill-{request.param}")
    with ThreadPoolExecutor(1) as pool:  # 2 x 2 ranks on 2 cores: slower, never wrong
        faulted = pool.submit(_launch, config, work / "killed", *layout, fault="kill@step=16,rank=1", restarts=1)
        straight = _forked(config, work / "straight", *layout)
        faulted = faulted.result()
    _ok(straight)
    _ok(faulted)
    return {"layout": request.param, "straight": work / "straight" / "runs" / "r",
            "killed": work / "killed" / "runs" / "r", "stderr": faulted.stderr}


@pytest.mark.slow
def test_killed_worker_restarts_and_resumes(killed: dict) -> None:
    run = killed["killed"]
    prov = json.loads((run / "provenance.json").read_text())
    assert str(prov["extra"]["resumed_from"]).endswith("step-10"), prov["extra"]
    assert (run / "checkpoints" / f"step-{STEPS}" / "COMMITTED").is_file()


@pytest.mark.slow
def test_killed_run_sees_each_example_once_per_epoch(killed: dict) -> None:
    """The sample-id logs (ids logged after the resumed checkpoint by the killed attempt are dropped
    on resume): every step once; per epoch every example exactly once; the same order as the
    uninterrupted run. In the pipeline each stage logs what it trained on: a stage that ran ahead
    of the kill does not count its lost steps."""
    ranks = (0, 1)
    got = {r: _ids(killed["killed"], r) for r in ranks}
    want = {r: _ids(killed["straight"], r) for r in ranks}
    for r in ranks:
        assert list(got[r]) == list(range(1, STEPS + 1)), f"rank {r}"
        assert got[r] == want[r], f"rank {r}: the resumed run trained on other examples"
    if killed["layout"] == "pipeline":  # both stages read the same global batch
        assert got[0] == got[1]
        order = [i for s in range(1, STEPS + 1) for i in got[0][s]]
    else:  # DDP: rank 0 holds the first half of each global batch, rank 1 the second
        order = [i for s in range(1, STEPS + 1) for r in ranks for i in got[r][s]]
    _assert_each_example_once_per_epoch(order)


@pytest.mark.slow
def test_killed_run_ends_with_the_uninterrupted_losses(killed: dict) -> None:
    files = [Path("metrics.jsonl")]
    if killed["layout"] == "pipeline":  # and each stage's own local loss
        files += [Path("stages") / f"stage{k}" / "metrics.jsonl" for k in (0, 1)]
    for f in files:
        got, want = _rows(killed["killed"] / f), _rows(killed["straight"] / f)
        assert [r["step"] for r in got] == [r["step"] for r in want], f
        for a, b in zip(got, want):
            assert _close(a["loss"], b["loss"]), (f, a["step"], a["loss"], b["loss"])
    got, want = _rows(killed["killed"] / "metrics.jsonl")[-1], _rows(killed["straight"] / "metrics.jsonl")[-1]
    assert _close(got["val_loss"], want["val_loss"]), (got["val_loss"], want["val_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["ddp"], indirect=True)  # one layout is enough for the launcher path
def test_killed_worker_under_real_torchrun_restarts_and_ends_with_the_uninterrupted_losses(
        killed: dict, config: Path, tmp_path: Path) -> None:
    """The same kill under the real `torchrun --max-restarts 1` (its dynamic rendezvous, with the
    agent's store shared with the workers): the restarted group keys the store by restart count, so
    it never reads the dead group's addresses (pytorch/pytorch#135712), and resumes like `launch`.
    Without that keying this run fails: gloo's connectFullMesh is refused at the dead rank's port."""
    argv = [*TORCHRUN, "--nproc-per-node", "2",
            "--max-restarts", "1", "-m", "dist_train", "run", str(config), f"run.dir={tmp_path / 'runs'}"]
    proc = subprocess.run(argv, cwd=tmp_path, env=clean_env(OMP_NUM_THREADS="1", DIST_TRAIN_FAULT="kill@step=16,rank=1"),
                          capture_output=True, text=True, timeout=240)
    _ok(proc)
    run = tmp_path / "runs" / "r"
    assert str(json.loads((run / "provenance.json").read_text())["extra"]["resumed_from"]).endswith("step-10")
    got, want = _rows(run / "metrics.jsonl"), _rows(killed["straight"] / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert all(_close(a["loss"], b["loss"]) for a, b in zip(got, want)), [(a["loss"], b["loss"]) for a, b in zip(got, want)]


# ----------------------------------------------------------------- 2. SIGTERM to the launcher


@pytest.mark.slow
def test_sigterm_to_launcher_commits_a_checkpoint_and_the_next_launch_resumes(config: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    argv = [*CLI, "launch", str(config), "--nproc", "2", f"run.dir={tmp_path / 'runs'}", "train.steps=1000000",
            "checkpoint.every=100000"]
    launcher = subprocess.Popen(argv, cwd=tmp_path, env=clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.1)
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        launcher.send_signal(signal.SIGTERM)
        out, err = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            for child in psutil.Process(launcher.pid).children(recursive=True):
                child.kill()
            launcher.kill()
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("dist-train: stopped after step ") and "SIGTERM" in last and "committed" in last, err
    stopped = int(last.split("stopped after step ")[1].split(":")[0])
    assert (run / "checkpoints" / f"step-{stopped}" / "COMMITTED").is_file()

    # The next run's ranks forked (what `launch` would start): resuming is theirs, the launcher's part
    # (SIGTERM to the workers, the commit, the exit status and line) is the launch above.
    again = _forked(config, tmp_path, f"train.steps={stopped + 3}")
    _ok(again)
    prov = json.loads((run / "provenance.json").read_text())
    assert str(prov["extra"]["resumed_from"]).endswith(f"step-{stopped}")
    assert [r["step"] for r in _rows(run / "metrics.jsonl")][-1] == stopped + 3


@pytest.mark.slow
def test_sigusr1_to_a_single_process_run_stops_with_a_checkpoint(config: Path, tmp_path: Path) -> None:
    """Slurm's --signal sends SIGUSR1 to every task directly (no launcher in between)."""
    run = tmp_path / "r"
    proc = subprocess.Popen([*CLI, "run", str(config), "parallel.backend=none", f"run.dir={tmp_path}",
                             "train.steps=1000000", "checkpoint.every=100000"], cwd=tmp_path,
                            env=clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGUSR1 (preemption)" in err, err[-3000:]
    stopped = int(err.split("stopped after step ")[1].split(":")[0])
    assert (run / "checkpoints" / f"step-{stopped}" / "COMMITTED").is_file()


# --------------------------------------------------------- 3. a kill while a checkpoint is written


@pytest.mark.slow
def test_kill_during_save_keeps_the_previous_checkpoint(config: Path, tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed after writing its part of step 20's checkpoint, before the commit. With
    keep=1 the older committed checkpoint must survive; the next launch resumes from it."""
    ckpts = tmp_path / "runs" / "r" / "checkpoints"
    failed = _launch(config, tmp_path, "checkpoint.keep=1", fault="kill_in_save@step=20,rank=1")
    assert failed.returncode != 0
    assert (ckpts / "step-10" / "COMMITTED").is_file(), "keep=1 must never delete the only good checkpoint"
    assert (ckpts / "step-20").is_dir() and not (ckpts / "step-20" / "COMMITTED").exists()

    again = _forked(config, tmp_path, "checkpoint.keep=1")  # the resume is the ranks' (forked, as above)
    _ok(again)
    run = tmp_path / "runs" / "r"
    assert str(json.loads((run / "provenance.json").read_text())["extra"]["resumed_from"]).endswith("step-10")
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == list(range(5, STEPS + 1, 5))
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-{STEPS}"]


# -------------------------------------------------------------------------------- 4. a hung peer


@pytest.mark.slow
@pytest.mark.serial  # asserts the wall time of the whole failure
def test_hung_peer_fails_the_job_within_the_timeout_naming_phase_and_peer(config: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = _launch(config, tmp_path, "runtime.steady_timeout_s=5", "runtime.stop_grace_s=2",
                   fault="stop@step=12,rank=1", timeout=180)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert "phase 'steady'" in last and "rank 1 did not answer" in last, proc.stderr[-3000:]
    # start-up and 12 steps (~10 s) + 5 s timeout + 5 s roll call + the 2 s grace before the agent
    # SIGKILLs the stopped rank: 23 s here. Torch's hard-coded 30 s grace instead took 51 s.
    assert elapsed < 40, elapsed


# ------------------------------------------------------------------------ 5. non-finite losses


@pytest.fixture(scope="module")
def nonfinite(config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Step 5's loss made NaN: under skip on rank 1 of 2, under skip in one process (the reference),
    under stop on rank 1 of 2; and one process without a fault. The stop goes through `launch`, whose
    exit status and last line its test reads; the other runs are judged by what their ranks log, so
    their ranks are forked (`_forked`)."""
    work = tmp_path_factory.mktemp("nonfinite")
    single = ["parallel.backend=none", "train.steps=12", "checkpoint.every=0"]

    def run(name: str, *overrides: str, fault: str = "") -> subprocess.CompletedProcess:
        return _forked(config, work, *overrides, nproc=1, fault=fault, run_dir=work / name, timeout=120)

    with ThreadPoolExecutor(1) as pool:
        stop = pool.submit(_launch, config, work / "ddp_stop", "train.steps=12", "checkpoint.every=0",
                           fault="nan@step=5,rank=1")
        procs = {
            "ddp_skip": _forked(config, work / "ddp_skip", "train.steps=12", "checkpoint.every=0",
                                "train.on_nonfinite=skip", fault="nan@step=5,rank=1"),
            "single_skip": run("single_skip", *single, "train.on_nonfinite=skip", fault="nan@step=5"),
            "single_clean": run("single_clean", *single),
            "ds_skip": _forked(config, work / "ds_skip", "train.steps=12", "checkpoint.every=0",
                               "train.on_nonfinite=skip", "parallel.backend=deepspeed", fault="nan@step=5,rank=1"),
            "pipe_skip": _forked(config, work / "pipe_skip", *PIPELINE, "train.steps=12",
                                 "checkpoint.every=0", "train.on_nonfinite=skip", fault="nan@step=5,rank=0"),
        }
        procs["ddp_stop"] = stop.result()
    runs = {k: work / k / ("runs" if k.startswith(("ddp", "ds", "pipe")) else "") / "r" for k in procs}
    return {"procs": procs, "runs": runs}


@pytest.mark.slow
def test_skip_drops_the_step_on_every_rank_like_one_process(nonfinite: dict) -> None:
    for k in ("ddp_skip", "single_skip", "single_clean"):
        _ok(nonfinite["procs"][k])
    ddp, single, clean = (_rows(nonfinite["runs"][k] / "metrics.jsonl")[-1]
                          for k in ("ddp_skip", "single_skip", "single_clean"))
    assert ddp["nonfinite_skipped"] == single["nonfinite_skipped"] == 1 and clean["nonfinite_skipped"] == 0
    assert all(np.isfinite([ddp["loss"], ddp["val_loss"]]))
    # 2 ranks == 1 process over the same global batches (fp32 reduction order: 1e-5)
    assert abs(ddp["val_loss"] - single["val_loss"]) <= 1e-5 * abs(single["val_loss"])
    assert abs(single["val_loss"] - clean["val_loss"]) > 1e-4, "the skipped step must really be skipped"


@pytest.mark.slow
@pytest.mark.parametrize("run", ["ddp_skip", "single_skip", "ds_skip", "pipe_skip"])
def test_a_dropped_step_leaves_the_logged_loss_finite(nonfinite: dict, run: str) -> None:
    """The window holding the NaN step (steps 1-5, log_every 5) logs the mean over its 4 applied
    steps, not NaN (null in JSON); the pipeline's stage 0 drops its own update and stage 1 trains on."""
    _ok(nonfinite["procs"][run])
    rows = _rows(nonfinite["runs"][run] / "metrics.jsonl")
    assert [r["step"] for r in rows] == [5, 10, 12]
    for r in rows:
        losses = [r["loss"]] + [r[k] for k in ("stage0_loss", "stage1_loss") if k in r]
        assert all(v is not None and np.isfinite(v) for v in losses), r
    if run == "pipe_skip":
        assert "stage0_loss" in rows[0] and "stage1_loss" in rows[0]


@pytest.mark.slow
def test_skip_under_deepspeed_drops_the_step_like_one_process(nonfinite: dict) -> None:
    """DeepSpeed steps inside its engine: the guard judges the loss before it and a vetoed step
    clears the engine's gradients and counts the micro-step. Same result as one process (the
    tolerance of the DeepSpeed backend tests, 1e-4)."""
    _ok(nonfinite["procs"]["ds_skip"])
    ds = _rows(nonfinite["runs"]["ds_skip"] / "metrics.jsonl")[-1]
    single = _rows(nonfinite["runs"]["single_skip"] / "metrics.jsonl")[-1]
    assert ds["nonfinite_skipped"] == 1 and np.isfinite(ds["val_loss"])
    assert abs(ds["val_loss"] - single["val_loss"]) <= 1e-4 * abs(single["val_loss"]), (ds["val_loss"], single["val_loss"])


@pytest.mark.slow
def test_stop_checkpoints_finite_weights_and_exits_with_a_message(nonfinite: dict) -> None:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    proc = nonfinite["procs"]["ddp_stop"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert "non-finite loss or gradients at step 5" in last and "train.on_nonfinite=stop" in last, last
    stopped = int(last.split("stopped after step ")[1].split(":")[0])
    assert stopped < 12
    ckpt = nonfinite["runs"]["ddp_stop"] / "checkpoints" / f"step-{stopped}"
    assert (ckpt / "COMMITTED").is_file()
    flat = ckpt.parent / "flat.pt"
    dcp_to_torch_save(ckpt, flat)
    state = torch.load(flat, weights_only=False)
    tensors = [t for t in _leaves(state) if torch.is_tensor(t) and t.is_floating_point()]
    assert tensors and all(torch.isfinite(t).all() for t in tensors), "a NaN reached the weights or optimizer"


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


# ------------------------------------------------------------------------------------ 6. bad data


def _write_bins(root: Path) -> dict[str, Path]:
    from dist_train.data import write_token_bin

    root.mkdir(parents=True, exist_ok=True)
    tokens = np.random.default_rng(0).integers(1, 200, 5000)
    paths = {name: root / f"{name}.bin" for name in ("truncated", "int32", "empty", "tiny")}
    write_token_bin(paths["truncated"], tokens, llmc_header=True)
    with open(paths["truncated"], "r+b") as fh:  # cut mid-array: the header still claims 5000 tokens
        fh.truncate(1024 + 2 * 3000)
    tokens.astype("<i4").tofile(paths["int32"])  # nanoGPT files are uint16
    paths["empty"].write_bytes(b"")
    write_token_bin(paths["tiny"], tokens[:40])
    return paths


BAD_DATA = {  # case -> (overrides, needles of the one error line)
    "truncated": (["data.name=token_bin", "data.path={truncated}"], ["truncated.bin", "truncated file"]),
    "wrong_dtype": (["data.name=token_bin", "data.path={int32}"], ["int32.bin", "32-bit values"]),
    "empty": (["data.name=token_bin", "data.path={empty}"], ["empty.bin", "no tokens"]),
    "smaller_than_a_batch": (["data.name=token_bin", "data.path={tiny}", "data.val_fraction=0.5"],
                             ["fewer than one global batch", "train.batch_size=32"]),
    "digits_smaller_than_a_batch": (["train.batch_size=1024"], ["359 examples", "fewer than one global batch"]),
    "unused_key": (["model.name=gpt", "data.name=stdlib_bytes", "data.path=/some/train.bin"],
                   ["data.path: not read by data.name=stdlib_bytes"]),
}


@pytest.fixture(scope="module")
def bad_data(config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("baddata")
    paths = {k: str(v) for k, v in _write_bins(work / "bins").items()}
    gpt = ["model.name=gpt", "model.n_layer=1", "model.width=16", "model.n_head=2", "model.block_size=8"]

    def one(case: str, call=forked_cli) -> subprocess.CompletedProcess:
        overrides, _ = BAD_DATA[case]
        lm = gpt if any(o.startswith("data.name=token_bin") for o in overrides) else []
        args = ["run", str(config), "parallel.backend=none", f"run.dir={work / case}", *lm,
                *(o.format(**paths) for o in overrides)]
        return call(args, work, env=clean_env(OMP_NUM_THREADS="1"))

    # One case as a real process (the whole process's stderr); the others forked from the fork server
    # (`forked_cli`: the same `main(argv)`, its exit status, stdout and stderr), one after the other.
    with ThreadPoolExecutor(1) as pool:
        real = pool.submit(one, "truncated", cli)
        procs = {case: one(case) for case in BAD_DATA if case != "truncated"}
        procs["truncated"] = real.result()
    return {"work": work, "procs": procs}


@pytest.mark.slow  # its module fixture starts a process per case
@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line_and_exit_2_before_training(case: str, bad_data: dict) -> None:
    proc = bad_data["procs"][case]
    assert_user_error(proc, *BAD_DATA[case][1])
    assert not (bad_data["work"] / case).exists(), "nothing may be written before the data is checked"


# --------------------------------------------------------------- 7. a checkpoint that runs code


class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def good_checkpoint(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("ckpt")
    _ok(_forked(config, work, "parallel.backend=none", "train.steps=2", nproc=1, run_dir=work, timeout=120))
    return work / "r" / "checkpoints" / "step-2"


@pytest.mark.parametrize("target", fast_first("trainer_rank0.pt", ".metadata"))
def test_checkpoint_with_a_code_running_pickle_is_refused(target: str, good_checkpoint: Path, config: Path,
                                                          tmp_path: Path) -> None:
    import shutil

    crafted = tmp_path / "step-2"
    shutil.copytree(good_checkpoint, crafted)
    marker = tmp_path / "code-ran"
    if target == ".metadata":  # DCP unpickles this file with plain pickle.load
        original = pickle.loads((crafted / target).read_bytes())
        (crafted / target).write_bytes(pickle.dumps([original, _Payload(marker)]))
    else:
        torch.save({"step": 2, "payload": _Payload(marker)}, crafted / target)
    # forked from the fork server: a code-running pickle there creates the marker all the same
    proc = forked_cli(["run", str(config), "parallel.backend=none", f"run.dir={tmp_path / 'runs'}",
                       f"checkpoint.resume={crafted}"], tmp_path, env=clean_env(OMP_NUM_THREADS="1"))
    assert_user_error(proc, str(crafted), target, "system")
    assert not marker.exists(), "the pickle's code ran"
    assert not (tmp_path / "runs").exists()


def test_pickle_scan_passes_real_checkpoints(good_checkpoint: Path) -> None:
    from dist_train.train.pickle_scan import unsafe_member

    assert unsafe_member(good_checkpoint) is None

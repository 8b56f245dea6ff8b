"""`dist-train slurm` and the shipped sbatch templates, on a real Slurm controller and node.

The end-to-end tests start munged, slurmctld and slurmd for this host (`slurm_cluster.py`), submit
the quickstart config (a 2-stage pipeline, made small) through `dist-train slurm` with 2 tasks, and
check what the job leaves: metrics to the last step, a committed checkpoint, `launcher: slurm` in
the provenance. The requeue test requeues the running job (`scontrol requeue`, what a preemption
with PreemptMode=REQUEUE does): every task stops after the same step and commits a checkpoint, the
job comes back in the same run directory and resumes from it. Deselect with `-m "not slurm"`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cli_helpers import CLI, assert_user_error, clean_env, cli
from slurm_cluster import SlurmCluster, ensure_installed

SMALL = ["model.n_layer=2", "model.width=32", "model.n_head=2", "model.block_size=16", "data.max_bytes=200000",
         "train.batch_size=8", "train.sample_tokens=0", "telemetry.progress=off", "telemetry.tensorboard=false"]


def _slurm(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "slurm", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


# ----------------------------------------------------------------------------- rendering, bad input


def test_dry_run_renders_the_template_into_the_run_dir(tmp_path: Path) -> None:
    proc = _slurm(["quickstart.yaml", "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
                   "--time", "0:30:00", "--partition", "cpu", "--dry-run", f"run.dir={tmp_path / 'runs'}",
                   "train.steps=7"], tmp_path, clean_env())
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / "runs" / "quickstart" / "slurm" / "train.sbatch"
    text = script.read_text()
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2", "#SBATCH --time=0:30:00",
                 "#SBATCH --partition=cpu", "#SBATCH --job-name=quickstart", "#SBATCH --requeue",
                 f"#SBATCH --output={tmp_path / 'runs' / 'quickstart'}/slurm-%j.out"):
        assert line in text.splitlines(), line
    assert not any(line.startswith("#SBATCH --gpus") for line in text.splitlines())  # CPU-only: no GPUs asked
    assert f"run.dir={tmp_path / 'runs'} train.steps=7" in text
    assert "srun --kill-on-bad-exit=1" in text and "scontrol requeue" in text
    subprocess.run(["bash", "-n", str(script)], check=True)  # valid bash


def test_dry_run_multinode_uses_the_multinode_template(tmp_path: Path) -> None:
    proc = _slurm(["configs/gpt_ddp.yaml", "--nodes", "2", "--gpus-per-node", "4", "--dry-run",
                   f"run.dir={tmp_path}"], Path(__file__).resolve().parents[1], clean_env())
    assert proc.returncode == 0, proc.stderr
    text = next(tmp_path.rglob("train_multinode.sbatch")).read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=4" in text
    assert "#SBATCH --gpus-per-node=4" in text and "not a routable address" in text


BAD = {  # case -> (arguments, text of the one error line)
    "zero_nodes": (["--nodes", "0", "--gpus-per-node", "1"], "--nodes 0"),
    "cpu_without_tasks": (["--nodes", "1", "--gpus-per-node", "0"], "--tasks-per-node"),
    "impossible_layout": (["--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "3"], "parallel.stages"),
    "bad_time": (["--nodes", "1", "--gpus-per-node", "2", "--time", "soon"], "--time 'soon'"),
    "no_slurm": (["--nodes", "1", "--gpus-per-node", "2"], "sbatch not found"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_slurm_input_is_one_line_and_exit_2(case: str, tmp_path: Path) -> None:
    args, needle = BAD[case]
    env = clean_env(PATH=os.path.dirname(CLI[0]))  # the venv only: no sbatch on PATH
    proc = cli(["slurm", "quickstart.yaml", *args, f"run.dir={tmp_path / 'runs'}"], tmp_path, env=env)
    assert_user_error(proc, needle)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------ a real Slurm cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    ensure_installed()
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def _submit(cluster: SlurmCluster, work: Path, name: str, *overrides: str) -> str:
    proc = _slurm(["quickstart.yaml", "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
                   f"run.dir={work}", f"run.name={name}", *SMALL, *overrides], work, cluster.env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("submitted job "), proc.stdout
    return proc.stdout.split()[2].rstrip(":")


def _report(cluster: SlurmCluster, run: Path, job: str) -> str:
    out = run / f"slurm-{job}.out"
    return (f"{cluster.job_state(job)}\n--- job output\n{out.read_text()[-3000:] if out.exists() else '(none)'}"
            f"\n--- slurmctld\n{(cluster.root / 'slurmctld.log').read_text()[-1500:]}")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.serial  # one Slurm cluster on the machine
def test_job_runs_the_quickstart_on_two_tasks(cluster: SlurmCluster, tmp_path: Path) -> None:
    job = _submit(cluster, tmp_path, "qs", "train.steps=12", "train.log_every=4", "train.eval_every=12")
    run = tmp_path / "qs"
    info = cluster.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=240)
    assert info and info["JobState"] == "COMPLETED", _report(cluster, run, job)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12]
    assert (run / "checkpoints" / "step-12" / "COMMITTED").is_file()
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["extra"]["world_size"] == 2 and prov["extra"]["stages"] == 2
    assert "done: step 12" in (run / f"slurm-{job}.out").read_text()
    assert (run / "slurm" / "train.sbatch").is_file()


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.serial  # one Slurm cluster on the machine
def test_requeued_job_resumes_from_the_checkpoint_it_committed(cluster: SlurmCluster, tmp_path: Path) -> None:
    steps = 400
    job = _submit(cluster, tmp_path, "rq", f"train.steps={steps}", "train.log_every=10", "train.eval_every=0",
                  "checkpoint.every=100000")
    run = tmp_path / "rq"
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (run / "metrics.jsonl").is_file(), _report(cluster, run, job)
    cluster.run(["scontrol", "requeue", job], check=True)
    pending = cluster.wait_job(job, ("PENDING",), timeout=90)
    assert pending and pending["Restarts"] == "1", _report(cluster, run, job)
    # A requeued job waits out a begin time of about two minutes; the administrator's "now" skips it.
    cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    info = cluster.wait_job(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=300)
    assert info and info["JobState"] == "COMPLETED", _report(cluster, run, job)

    attempts = [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()]
    assert [a["attempt"] for a in attempts] == [0, 1], attempts
    stopped = attempts[1]["start_step"]
    assert 0 < stopped < steps and attempts[1]["resumed_from"] == str(run / "checkpoints" / f"step-{stopped}")
    output = (run / f"slurm-{job}.out").read_text()
    assert f"stopped after step {stopped}: stopped by SIGTERM" in output, output[-3000:]
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(10, steps + 1, 10)), "every logged step exactly once across the requeue"
    assert (run / "checkpoints" / f"step-{steps}" / "COMMITTED").is_file()

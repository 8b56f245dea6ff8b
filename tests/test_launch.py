"""`dist-train launch` end to end (2 local gloo workers), worker restarts, and `dist-train plan`."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from dist_train.config.load import dump_config, load_config

from cli_helpers import CLI, TORCHRUN, clean_env  # tests/ is on sys.path



def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def launched(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("launch")
    overrides = [f"run.dir={work / 'runs'}", "train.steps=4"]
    proc = subprocess.run([*CLI, "launch", str(tiny_config), "--nproc", "2", *overrides], cwd=work,
                          env=clean_env(), capture_output=True, text=True, timeout=180)
    return proc, work / "runs" / "tiny", overrides


def test_launch_exits_0(launched) -> None:
    proc, run_dir, _ = launched
    assert proc.returncode == 0, f"stderr:\n{proc.stderr}\nstdout:\n{proc.stdout}"
    assert "Traceback" not in proc.stderr
    assert re.search(r"^done: step 4, loss [\d.]+, val loss [\d.]+", proc.stdout, re.M), proc.stdout
    assert proc.stdout.count("done:") == 1  # only rank 0 reports


def test_launch_metrics(launched) -> None:
    _, run_dir, _ = launched
    recs = records(run_dir / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        assert r["loss"] > 0 and r["samples_per_s"] > 0 and r["lr"] > 0
    assert "val_loss" in recs[-1]


def test_launch_provenance(launched, tiny_config: Path) -> None:
    _, run_dir, overrides = launched
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert isinstance(prov["git"], dict) and re.fullmatch(r"[0-9a-f]{40}", prov["git"]["sha"])
    assert "dirty" in prov["git"]
    assert prov["packages"].get("torch") and prov["packages"].get("dist-train")
    command = prov["command"]
    # the command the user typed (launch), not the workers' internal `python -m dist_train run`
    assert isinstance(command, list) and command[:2] == ["dist-train", "launch"] and str(tiny_config) in command
    assert all(o in command for o in overrides)
    assert prov["extra"]["world_size"] == 2 and prov["extra"]["backend"] == "ddp"
    assert prov["extra"]["resumed_from"] is None
    assert prov["env"]["WORLD_SIZE"] == "2"


@pytest.mark.slow
def test_real_torchrun_trains_the_same_losses_as_launch(launched, tiny_config: Path, tmp_path: Path) -> None:
    """The README's `torchrun ... -m dist_train run` line, with the real torchrun (its own c10d
    rendezvous and shared store): same config, same seed, so the same losses as `dist-train launch`
    (rtol 1e-6: both are 2 gloo ranks running the same arithmetic)."""
    proc, run_dir, _ = launched
    assert proc.returncode == 0, proc.stderr
    argv = [*TORCHRUN, "--nproc-per-node", "2",
            "-m", "dist_train", "run", str(tiny_config), f"run.dir={tmp_path / 'runs'}", "train.steps=4"]
    ran = subprocess.run(argv, cwd=tmp_path, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=180)
    assert ran.returncode == 0, f"stderr:\n{ran.stderr}\nstdout:\n{ran.stdout}"
    ours, theirs = records(run_dir / "metrics.jsonl"), records(tmp_path / "runs" / "tiny" / "metrics.jsonl")
    assert [r["step"] for r in theirs] == [1, 2, 3, 4]
    assert [r["loss"] for r in theirs] == pytest.approx([r["loss"] for r in ours], rel=1e-6)
    prov = json.loads((tmp_path / "runs" / "tiny" / "provenance.json").read_text())
    assert prov["extra"]["world_size"] == 2


def test_launch_config_yaml_is_resolved_config(launched, tiny_config: Path) -> None:
    _, run_dir, overrides = launched
    expected = load_config(tiny_config, overrides)
    text = (run_dir / "config.yaml").read_text()
    assert text == dump_config(expected)
    assert load_config(run_dir / "config.yaml") == expected


def test_launch_tensorboard_and_checkpoint(launched) -> None:
    _, run_dir, _ = launched
    events = list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    step = run_dir / "checkpoints" / "step-4"
    marker = json.loads((step / "COMMITTED").read_text())
    assert marker["step"] == 4 and marker["world_size"] == 2
    assert (step / "trainer_rank0.pt").is_file() and (step / "trainer_rank1.pt").is_file()


# -------------------------------------------------------------------------------------- restarts

RESTART_STEPS = 30


def _workers(launcher: psutil.Process) -> list[psutil.Process]:
    out = []
    for p in launcher.children(recursive=True):
        try:
            cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "dist_train" in cmd and "run" in cmd:
            out.append(p)
    return out


def _rank(p: psutil.Process) -> int:
    try:
        return int(p.environ().get("RANK", "-1"))
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return -1


def _launch_and_kill_one_worker(config: Path, work: Path, max_restarts: int, extra_env: dict | None = None,
                                wait_s: float = 90) -> dict:
    """Launch 2 workers, SIGKILL rank 1 once the first checkpoint is committed, wait for the launcher.

    rc is None when the launcher had not finished `wait_s` seconds after the kill (it is then killed).
    """
    run_dir = work / "runs" / "tiny"
    argv = [*CLI, "launch", str(config), "--nproc", "2", "--max-restarts", str(max_restarts),
            f"run.dir={work / 'runs'}", f"train.steps={RESTART_STEPS}", "checkpoint.every=2",
            "checkpoint.keep=2"]
    env = clean_env()
    env.update(extra_env or {})
    out, err = (work / "stdout.txt").open("w"), (work / "stderr.txt").open("w")
    launcher = subprocess.Popen(argv, cwd=work, env=env, stdout=out, stderr=err)
    killed = None
    rc = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and launcher.poll() is None:
            if list((run_dir / "checkpoints").glob("step-*/COMMITTED")):
                break
            time.sleep(0.05)
        assert launcher.poll() is None, "launcher finished before the first checkpoint was seen"
        workers = _workers(psutil.Process(launcher.pid))
        assert len(workers) == 2, [w.cmdline() for w in workers]
        victim = max(workers, key=_rank)  # rank 1 (any worker if ranks cannot be read)
        killed = {"pid": victim.pid, "rank": _rank(victim),
                  "committed": sorted(int(p.parent.name.split("-")[1])
                                      for p in (run_dir / "checkpoints").glob("step-*/COMMITTED"))}
        victim.send_signal(signal.SIGKILL)
        try:
            rc = launcher.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            rc = None
    finally:
        if launcher.poll() is None:
            for w in _workers(psutil.Process(launcher.pid)):
                w.kill()
            launcher.kill()
            launcher.wait()
        out.close()
        err.close()
    assert killed["committed"] and max(killed["committed"]) < RESTART_STEPS, (
        f"the kill must land mid-run: {killed}")
    return {"rc": rc, "run_dir": run_dir, "killed": killed,
            "stdout": (work / "stdout.txt").read_text(), "stderr": (work / "stderr.txt").read_text()}


def _assert_restarted_and_finished(res: dict) -> None:
    report = f"{res['killed']}\nexit: {res['rc']}\nstderr:\n{res['stderr'][-4000:]}\nstdout:\n{res['stdout']}"
    assert res["rc"] == 0, report
    run_dir = res["run_dir"]
    steps = [r["step"] for r in records(run_dir / "metrics.jsonl")]
    # resumed from the last committed checkpoint: every step exactly once, through the last one
    assert steps == list(range(1, RESTART_STEPS + 1)), report
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["extra"]["resumed_from"], "the restarted workers must have resumed from a checkpoint"
    assert (run_dir / "checkpoints" / f"step-{RESTART_STEPS}" / "COMMITTED").is_file()
    assert f"done: step {RESTART_STEPS}" in res["stdout"], report


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_max_restarts_restarts_a_killed_worker(tiny_config: Path, tmp_path: Path) -> None:
    _assert_restarted_and_finished(_launch_and_kill_one_worker(tiny_config, tmp_path, max_restarts=1, wait_s=60))


@pytest.fixture(scope="module")
def killed_without_restarts(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _launch_and_kill_one_worker(tiny_config, tmp_path_factory.mktemp("norestart"), max_restarts=0)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_no_restarts_a_killed_worker_fails_the_job(killed_without_restarts: dict) -> None:
    res = killed_without_restarts
    assert res["rc"] != 0, res
    steps = [r["step"] for r in records(res["run_dir"] / "metrics.jsonl")]
    assert steps and steps[-1] < RESTART_STEPS
    assert "done:" not in res["stdout"]


@pytest.mark.slow
def test_no_restarts_launcher_names_the_dead_worker(killed_without_restarts: dict) -> None:
    res = killed_without_restarts
    assert res["rc"] == 1, res
    last = [line for line in res["stderr"].splitlines() if line.strip()][-1]
    assert last.startswith("dist-train: error: worker rank 1 exited with status -9"), res["stderr"]
    assert "AttributeError" not in res["stderr"]


def test_a_failed_group_is_stopped_within_the_configured_grace() -> None:
    """torch stops the survivors of a failed worker with a hard-coded 30 s grace, in the process
    context's poll and in the agent (pytorch/pytorch#119856); the launcher routes
    `runtime.stop_grace_s` into both. Driven here without workers: each path must ask for the
    configured timeout, and an explicit timeout still wins."""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import PContext

    from dist_train.runtime.launch import _stop_within_grace

    asked = []

    class Agent(LocalElasticAgent):
        def __init__(self) -> None:  # no spec, no workers: only the grace is under test
            pass

        def _shutdown(self, death_sig=signal.SIGTERM, timeout=30) -> None:
            asked.append(("agent", timeout))

    class Context(PContext):
        def __init__(self) -> None:
            self._tail_logs, self.filtered_stdout, self.filtered_stderr = [], None, None

        def _close(self, death_sig, timeout=30) -> None:
            asked.append(("context", timeout))

        _start = _poll = pids = None  # abstract in PContext; never reached here

    _stop_within_grace(7)
    _stop_within_grace(3)  # a second launch in one process wraps torch's close once, with its own grace
    Agent()._stop_workers(None)
    Context().close()
    Context().close(timeout=11)
    assert asked == [("agent", 3), ("context", 3), ("context", 11)]


# ------------------------------------------------------------------------------------------- plan


def _plan_rows(stdout: str) -> dict[str, str]:
    rows = {}
    for line in stdout.splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    return rows


def test_plan_prints_the_plan_and_creates_nothing(tiny_config: Path, tmp_path: Path) -> None:
    from dist_train.data import build_dataset
    from dist_train.models import build_model, count_parameters

    runs = tmp_path / "runs"
    proc = subprocess.run([*CLI, "plan", str(tiny_config), "--nproc", "2", f"run.dir={runs}"], cwd=tmp_path,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = _plan_rows(proc.stdout)
    assert rows["world"].startswith("2 ranks (1 node(s) x 2)"), rows
    assert "cpu (gloo)" in rows["world"]
    assert rows["backend"].startswith("ddp"), rows
    cfg = load_config(tiny_config)
    model = build_model(cfg.model, build_dataset(cfg.data, cfg.model.block_size).info)
    assert f"{count_parameters(model) / 1e6:.2f} M parameters" in rows["model"], rows
    assert re.search(r"weights [\d.]+ MiB, grads [\d.]+ MiB, optimizer [\d.]+ MiB, activations ~[\d.]+ MiB",
                     rows["memory/rank"]), rows
    assert rows["batch"].startswith("8 global = 2 dp ranks x 1 micro-batches x 4"), rows
    assert "fresh start" in rows["steps"]
    assert not runs.exists(), "plan must not create the run directory"
    assert not list(tmp_path.glob("runs*")) and sorted(p.name for p in tmp_path.iterdir()) == []


def _optimizer_mib(*overrides: str) -> float:
    from dist_train.train.plan import plan

    text = plan(None, ["parallel.stages=1", "model.n_layer=2", "model.width=32", "model.n_head=2",
                       "model.block_size=16", "data.max_bytes=200000", *overrides], 2, 1)
    return float(re.search(r"optimizer ([\d.]+) MiB", text).group(1))


def test_plan_optimizer_state_follows_the_optimizer() -> None:
    """AdamW: two fp32 moments (8 B/param under DDP); SGD: one momentum buffer or nothing; DP-SGD:
    its base optimizer's; DIFF2: two fp32 parameter copies."""
    from dist_train.config import load_config
    from dist_train.data import build_dataset
    from dist_train.models import build_model, count_parameters

    cfg = load_config(None, ["parallel.stages=1", "model.n_layer=2", "model.width=32", "model.n_head=2",
                             "model.block_size=16", "data.max_bytes=200000"])
    data = build_dataset(cfg.data, 16)
    mib = count_parameters(build_model(cfg.model, data.info)) / 2**20
    assert _optimizer_mib("optim.name=adamw") == pytest.approx(8 * mib, abs=0.06)
    assert _optimizer_mib("optim.name=sgd", "optim.beta1=0.9") == pytest.approx(4 * mib, abs=0.06)
    assert _optimizer_mib("optim.name=sgd", "optim.beta1=0") == 0.0
    dp = ("optim.name=dp_sgd", "privacy.noise_multiplier=1.0")
    assert _optimizer_mib(*dp, "privacy.base_optimizer=sgd", "optim.beta1=0") == 0.0
    assert _optimizer_mib(*dp, "privacy.base_optimizer=adamw") == pytest.approx(8 * mib, abs=0.06)
    diff2 = ("optim.name=diff2", "privacy.diff2.sigma1=1", "privacy.diff2.sigma2=1",
             f"train.batch_size={data.num_samples('train')}")  # DIFF2: the whole training set each round
    assert _optimizer_mib(*diff2) == pytest.approx(8 * mib, abs=0.06)

"""`checkpoint.async`: the state is staged to host memory and written in the background; the
COMMITTED marker still comes last, a kill during the background write costs nothing but the steps
since the previous checkpoint, and at most one save is in flight.

Per layout (FSDP2 on 2 gloo ranks; a 2-stage local-learning pipeline), two runs of 6 steps at once:
  straight  (forked ranks) async, a save after every step, rank 0's background write of step 2 made 1 s slower
            (`slow_async_write`): the save of step 3 must wait for it;
  killed    async, a save every 2 steps, rank 1 SIGKILLed inside the background write of step 4
            (`kill_in_async_write`), under `dist-train launch --max-restarts 1`: the restarted
            group resumes from step 2's checkpoint, the last committed one.
Saving reads the state and changes nothing, so the two runs train the same: the killed run's losses
must equal the straight run's exactly (the resumed run replays the same float operations from the
same state, as tests/test_resume.py shows for synchronous checkpoints).
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cli_helpers import CLI, assert_user_error, clean_env, forked_cli
from tiers import fast_first

STEPS = 6
LAYOUTS = {"fsdp": ["parallel.backend=fsdp"],
           "pipeline": ["parallel.stages=2", "model.n_layer=4", "local.method=dgl"]}
ASYNC = ["checkpoint.async=true", "optim.schedule=constant", "train.sample_tokens=0", "checkpoint.keep=3"]


def _launch(work: Path, cfg: list[str], fault: str, restarts: int) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)
    argv = [*CLI, "launch", "quickstart.yaml", "--nproc", "2", "--threads", "1", "--max-restarts", str(restarts),
            f"run.dir={work}", "run.name=r", f"train.steps={STEPS}", *cfg]
    return subprocess.run(argv, cwd=work, env=clean_env(OMP_NUM_THREADS="1", DIST_TRAIN_FAULT=fault),
                          capture_output=True, text=True, timeout=300)


def _rows(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", params=fast_first(*LAYOUTS))
def runs(request, dt, tmp_path_factory) -> dict:
    cfg = [*dt.TINY_GPT, *ASYNC, *LAYOUTS[request.param]]
    if request.param == "pipeline":
        cfg.remove("parallel.stages=1")
    work = tmp_path_factory.mktemp(f"async-{request.param}")
    with ThreadPoolExecutor(2) as pool:  # 2 x 2 ranks on 2 cores: slower, never wrong
        straight = pool.submit(dt.forked, work / "straight", "r", *cfg, "checkpoint.every=1", steps=STEPS,
                               env={"DIST_TRAIN_FAULT": "slow_async_write@step=2,rank=0,seconds=1"})
        # stop_grace_s: the surviving rank, stuck on its dead peer, is not waited for 30 s
        killed = pool.submit(_launch, work / "killed", [*cfg, "checkpoint.every=2", "runtime.stop_grace_s=2"],
                             "kill_in_async_write@step=4,rank=1", 1)
        straight.result()
        proc = killed.result()
    assert proc.returncode == 0, f"killed: exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return {"layout": request.param, "straight": work / "straight" / "r", "killed": work / "killed" / "r"}


@pytest.mark.slow
def test_kill_in_background_write_resumes_from_the_previous_checkpoint_losing_nothing(runs: dict) -> None:
    prov = json.loads((runs["killed"] / "provenance.json").read_text())
    assert str(prov["extra"]["resumed_from"]).endswith("step-2"), prov["extra"]
    files = ["metrics.jsonl"] + (["stages/stage0/metrics.jsonl"] if runs["layout"] == "pipeline" else [])
    for f in files:
        got, want = _rows(runs["killed"], f), _rows(runs["straight"], f)
        assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1)), f
        assert [r["loss"] for r in got] == [r["loss"] for r in want], f  # bit for bit
    assert _rows(runs["killed"])[-1]["val_loss"] == _rows(runs["straight"])[-1]["val_loss"]


@pytest.mark.slow
def test_every_committed_checkpoint_holds_all_its_shards(runs: dict) -> None:
    expected = {".metadata", "COMMITTED", "__0_0.distcp", "__1_0.distcp", "trainer_rank0.pt", "trainer_rank1.pt"}
    for name, steps in (("straight", [4, 5, 6]), ("killed", [2, 4, 6])):
        root = runs[name] / "checkpoints"
        assert sorted(p.name for p in root.iterdir()) == sorted(f"step-{s}" for s in steps), name
        for s in steps:
            assert {p.name for p in (root / f"step-{s}").iterdir()} == expected, (name, s)
            assert json.loads((root / f"step-{s}" / "COMMITTED").read_text())["step"] == s


@pytest.mark.slow
def test_at_most_one_save_in_flight_and_the_stall_is_logged(runs: dict) -> None:
    """A row carries the stall of the saves since the previous row: row 3 the save of step 2 (the
    copy to host memory only), row 4 the save of step 3, which first waits for step 2's slow write."""
    stall = {r["step"]: r.get("checkpoint_stall_s") for r in _rows(runs["straight"])}
    assert stall[1] is None and all(stall[s] is not None for s in range(2, STEPS + 1)), stall
    assert stall[4] > 0.5, stall  # waited for the 1 s slower write of step 2
    assert stall[3] < stall[4] and stall[5] < stall[4], stall
    assert "  async: true" in (runs["straight"] / "config.yaml").read_text().splitlines()


@pytest.mark.parametrize("backend", fast_first("deepspeed", "fairscale"))
def test_async_checkpoints_with_a_backend_of_its_own_format_is_one_line(backend: str, tmp_path: Path) -> None:
    proc = forked_cli(["run", "quickstart.yaml", "parallel.stages=1", f"parallel.backend={backend}",
                       "checkpoint.async=true", f"run.dir={tmp_path}"], tmp_path, env=clean_env(OMP_NUM_THREADS="1"))
    assert_user_error(proc, "checkpoint.async", f"parallel.backend={backend}")
    assert not any(tmp_path.iterdir())

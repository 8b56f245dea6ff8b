"""`dist-train bench soak`: a long run that is killed twice and must lose nothing.

The quickstart's own layout (a 2-stage local-learning pipeline on 2 gloo ranks, a smaller GPT so
that several hundred steps take a minute) runs twice through `dist-train launch`, one after the
other: once undisturbed (the baseline), once with `--max-restarts 2` and two SIGKILLs injected
(`DIST_TRAIN_FAULT`): rank 1 in the first attempt, rank 0 in the second, each mid-way between two
checkpoints. Both runs log the example ids of every step (`telemetry.sample_ids`).

Figures (all read from the runs' own files, none computed by the code under test):
- restarts: lines in the faulted run's `attempts.jsonl` minus one (the launcher's agent restarted it);
- steps lost: steps of the schedule with no metrics record or no sample-id record (0 = nothing lost);
- steps replayed: per kill, the kill's step minus the checkpoint the restart resumed from;
- time to resume: per kill, from the kill (the fault's own log line) to the restarted attempt's
  first step (its `attempts.jsonl` line): process start, rendezvous, checkpoint load;
- the final loss of both runs (equal to 1e-6 relative when nothing was lost or double counted), and
  the ids of every step (identical), and the faulted run's wall time over the baseline's.

Both runs have a wall-clock limit (a hang fails the benchmark instead of blocking it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dist_train.bench.report import command_line, document, make_target, pick_size, utc_now

SIZES = {
    # steps, checkpoint every, kills (step, rank, attempt), wall-clock limit per run
    "full": {"steps": 600, "every": 50, "kills": [(230, 1, 0), (470, 0, 1)], "limit_s": 900},
    "quick": {"steps": 300, "every": 50, "kills": [(130, 1, 0), (220, 0, 1)], "limit_s": 600},
    "smoke": {"steps": 30, "every": 10, "kills": [(14, 1, 0), (25, 0, 1)], "limit_s": 300},
}
MODEL = ["model.n_layer=4", "model.width=64", "model.n_head=4", "model.block_size=32", "data.max_bytes=1000000",
         "train.batch_size=16", "train.log_every=1", "train.eval_every=0", "train.sample_tokens=0",
         "telemetry.sample_ids=true", "telemetry.tensorboard=false", "telemetry.progress=off"]
REL = 1e-6


def _launch(work: Path, size: dict, fault: str, restarts: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "DIST_TRAIN_FAULT"))}
    env.update(OMP_NUM_THREADS="1")
    if fault:
        env.update(DIST_TRAIN_FAULT=fault, DIST_TRAIN_FAULT_LOG=str(work / "faults.jsonl"))
    argv = [sys.executable, "-m", "dist_train", "launch", "quickstart.yaml", "--nproc", "2", "--threads", "1",
            "--max-restarts", str(restarts), f"run.dir={work}", "run.name=soak", f"train.steps={size['steps']}",
            f"checkpoint.every={size['every']}", "checkpoint.keep=2", *MODEL]
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=size["limit_s"])
    return proc, time.perf_counter() - t0


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        raise RuntimeError(f"bench soak: the {what} run exited {proc.returncode}:\n{proc.stderr[-3000:]}")


def run(quick: bool) -> dict[str, Any]:
    size_name, size = pick_size(SIZES, quick)
    command, started = command_line(), utc_now()
    fault = ";".join(f"kill@step={s},rank={r},attempt={a}" for s, r, a in size["kills"])
    with tempfile.TemporaryDirectory(prefix="dist-train-bench-soak-") as tmp:
        base_proc, base_wall = _launch(Path(tmp) / "baseline", size, "", 0)
        _check(base_proc, "baseline")
        soak_proc, soak_wall = _launch(Path(tmp) / "faulted", size, fault, len(size["kills"]))
        _check(soak_proc, "faulted")
        base, soak = Path(tmp) / "baseline" / "soak", Path(tmp) / "faulted" / "soak"
        metrics = {"baseline": _lines(base / "metrics.jsonl"), "faulted": _lines(soak / "metrics.jsonl")}
        ids = {name: {rank: {r["step"]: r["ids"] for r in _lines(run / "samples" / f"rank{rank}" / "metrics.jsonl")}
                      for rank in (0, 1)} for name, run in (("baseline", base), ("faulted", soak))}
        attempts = _lines(soak / "attempts.jsonl")
        fired = _lines(Path(tmp) / "faulted" / "faults.jsonl")

    steps = size["steps"]
    rows = []
    for name, wall in (("baseline", base_wall), ("faulted", soak_wall)):
        logged = [r["step"] for r in metrics[name]]
        lost = sum(1 for s in range(1, steps + 1)
                   if logged.count(s) != 1 or any(s not in ids[name][rank] for rank in (0, 1)))
        rows.append({"run": name, "wall_s": wall, "attempts": len(attempts) if name == "faulted" else 1,
                     "steps_logged": len(logged), "steps_lost": lost, "final_loss": metrics[name][-1]["loss"]})
    restarts = len(attempts) - 1
    same_ids = ids["baseline"] == ids["faulted"]
    a, b = rows[1]["final_loss"], rows[0]["final_loss"]
    loss_rel = abs(a - b) / max(abs(b), 1e-12)

    kills = []
    for k, f in enumerate(fired):
        resumed = attempts[k + 1] if k + 1 < len(attempts) else None
        kills.append({"run": f"kill {k + 1}", "step": f["step"], "rank": f["rank"], "attempt": f["attempt"],
                      "resumed_at_step": resumed["start_step"] if resumed else None,
                      "steps_replayed": f["step"] - resumed["start_step"] if resumed else None,
                      "time_to_resume_s": resumed["time"] - f["time"] if resumed else None})
    setup = {"size": size_name, "steps": steps, "checkpoint_every": size["every"], "world_size": 2,
             "threads_per_rank": 1, "layout": "quickstart: 2-stage local-learning pipeline (DGL), GPT "
             "4 layers x 64, block 32, stdlib bytes", "faults": fault, "max_restarts": len(size["kills"])}
    targets = [
        make_target("steps_lost", rows[1]["steps_lost"], "<=", 0,
                    description="steps of the schedule missing or doubled in the faulted run's logs"),
        make_target("restarts", restarts, ">=", len(size["kills"]),
                    description="restarts of the faulted run (attempts.jsonl lines - 1); one per injected kill"),
        make_target("final_loss_rel_diff", loss_rel, "<=", REL,
                    description="|final loss faulted - baseline| / baseline (the same float operations replayed)"),
        make_target("same_sample_ids", 1.0 if same_ids else 0.0, ">=", 1.0,
                    description="1 when every step of both runs trained on the same example ids on both ranks"),
    ]
    reported = [{"metric": "wall_time_ratio", "value": soak_wall / base_wall,
                 "description": "faulted run's wall time / the baseline's (restarts + replayed steps)"}]
    for k in kills:
        reported.append({"metric": f"time_to_resume_s ({k['run']})", "value": k["time_to_resume_s"],
                         "description": "kill -> the restarted attempt's first step"})
    return document("soak", command, started, setup, rows + kills, targets, reported)

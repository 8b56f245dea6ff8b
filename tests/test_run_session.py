"""The run session's hooks: what benchmarks and tests observe of a run instead of patching the loops."""

from __future__ import annotations

import json
from pathlib import Path


def test_hooks_see_the_setup_every_step_and_every_logged_window(tmp_path: Path) -> None:
    from dist_train.config import load_config
    from dist_train.runtime import discover, init_distributed
    from dist_train.train.hooks import Hooks
    from dist_train.train.loop import train

    cfg = load_config(None, [
        "model.n_layer=2", "model.width=32", "model.n_head=2", "model.block_size=16", "data.max_bytes=200000",
        "train.batch_size=8", "train.steps=5", "train.log_every=2", "train.eval_batches=1", "parallel.backend=none",
        "parallel.stages=1", "runtime.device=cpu", "telemetry.tensorboard=false", 'telemetry.progress="off"',
        "telemetry.energy=none", "checkpoint.at_end=false", "checkpoint.resume=never", f"run.dir={tmp_path}",
        "run.name=hooks"])
    ctx = init_distributed(cfg, discover({}))
    setups, steps, windows = [], [], []
    last = train(cfg, ctx, ["test"], hooks=Hooks(on_setup=setups.append, on_step=steps.append,
                                                 on_window=lambda done, record: windows.append((done, record["loss"]))))
    assert len(setups) == 1 and setups[0].module is not None
    assert steps == [1, 2, 3, 4, 5]
    logged = [json.loads(line) for line in (tmp_path / "hooks" / "metrics.jsonl").read_text().splitlines()]
    assert windows == [(r["step"], r["loss"]) for r in logged] == [(2, logged[0]["loss"]), (4, logged[1]["loss"]),
                                                                   (5, last["loss"])]

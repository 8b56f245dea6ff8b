"""`dist-train bench local-methods` at its smoke size: it runs, reports a row per (method, K, task)
and every target (`met` computed from the value), chooses each lr on validation and
never on test, and its BP baseline (`local_reference` with one stage) is the framework's BP loop.

Nothing here asserts that a target is met: that is a measurement, recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from cli_helpers import CLI, clean_env  # tests/ is on sys.path


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    tmp = tmp_path_factory.mktemp("bench-methods")
    out = tmp / "methods.json"
    env = clean_env(DIST_TRAIN_BENCH_SIZE="smoke")  # tiny models, two steps: runs, measures nothing
    proc = subprocess.run([*CLI, "bench", "local-methods", "--quick", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=280, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow  # the benchmark at its smoke size (the module fixture)
@pytest.mark.timeout(300)
def test_report_contract_rows_and_targets(smoke) -> None:
    from dist_train.bench.local_methods import KS, METHODS, SIZES, TARGETED, TARGETS, configurations

    doc, stdout = smoke
    for key in ("name", "machine", "command", "date", "provenance", "results", "targets"):
        assert key in doc, key
    assert doc["name"] == "local-methods" and "bench local-methods" in doc["command"]
    extra = doc["provenance"]["extra"]
    assert extra["size"] == "smoke" and extra["threads_per_rank"] == 1

    # One sweep row per (task, method, K) plus BP per task; every one ran and records its overrides.
    sweep = [r for r in doc["results"] if r["part"] == "sweep"]
    assert [(r["task"], r["method"], r["K"]) for r in sweep] == configurations(SIZES["smoke"])
    assert {r["task"] for r in sweep} == {"digits-mlp", "digits-cnn", "shapes32-cnn", "gpt-bytes"}
    for r in sweep:
        assert "error" not in r, r
        assert r["lr"] in SIZES["smoke"]["tasks"][r["task"]]["lrs"]
        assert f"optim.lr={r['lr']}" in r["overrides"] and "parallel.backend=none" in r["overrides"]
        assert (f"parallel.stages={r['K']}" in r["overrides"]) and math.isfinite(r["test_loss"])
        if r["task"] == "gpt-bytes":  # language model: test loss, and its ratio to BP's
            bp = next(s for s in sweep if s["task"] == "gpt-bytes" and s["method"] == "bp")
            assert r["method"] == "bp" or r["loss_x"] == pytest.approx(r["test_loss"] / bp["test_loss"])
        else:
            assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0

    # Every target, with its op and threshold; `met` follows from the value.
    targets = {t["metric"]: t for t in doc["targets"]}
    names = {f"acc_gap_points_{m}_k{k}" for m in TARGETED for k in KS}
    assert set(targets) == names
    for m in TARGETED:
        for k in KS:
            t = targets[f"acc_gap_points_{m}_k{k}"]
            op, threshold = TARGETS[k]
            assert set(t) == {"metric", "value", "op", "target", "met"}
            assert t["op"] == op == "<=" and t["target"] == threshold
            assert t["value"] is not None and math.isfinite(t["value"])
            assert t["met"] == (t["value"] <= threshold)
            assert f"TARGET {'met' if t['met'] else 'MISSED'}: {t['metric']}" in stdout
            # the value is the digits-CNN row's gap: BP test accuracy minus the method's, in points
            row = next(r for r in sweep if r["task"] == "digits-cnn" and r["method"] == m and r["K"] == k)
            bp = next(r for r in sweep if r["task"] == "digits-cnn" and r["method"] == "bp")
            assert t["value"] == pytest.approx(row["gap_pts"]) == pytest.approx(100 * (bp["test_acc"] - row["test_acc"]))

    # Every method on the real 2-rank pipeline, beside the reference's figure for the same config.
    pipe = [r for r in doc["results"] if r["part"] == "pipeline"]
    assert [r["method"] for r in pipe] == list(METHODS)
    for r in pipe:
        assert "error" not in r, r
        assert r["K"] == 2 and r["samples_s"] > 0 and 0.0 <= r["val_acc"] <= 1.0 and r["ref_val_acc"] is not None
    # Synchronous vs asynchronous, per repeat and as medians.
    modes = [(r["mode"], r["repeat"]) for r in doc["results"] if r["part"] == "async"]
    assert ("sync", "median") in modes and ("async", "median") in modes
    for r in doc["results"]:
        if r["part"] == "async" and r["repeat"] != "median":
            assert r["samples_s"] > 0 and math.isfinite(r["val_loss"]) and r.get("cost_ratio", 0) > 0
            assert f"local.asynchronous={'true' if r['mode'] == 'async' else 'false'}" in r["overrides"]


@pytest.mark.slow  # the benchmark at its smoke size (the module fixture)
@pytest.mark.timeout(300)
def test_lr_is_chosen_on_validation_never_on_test(smoke) -> None:
    """Each row's lr is the argmax of the mean validation accuracy over seeds (GPT: argmin of the
    validation loss), recomputed here from the individual runs the document records."""
    doc, _ = smoke
    runs = doc["provenance"]["extra"]["sweep_runs"]
    for r in (r for r in doc["results"] if r["part"] == "sweep"):
        mine = [x for x in runs if (x["task"], x["method"], x["k"]) == (r["task"], r["method"], r["K"])]
        lrs = sorted({x["lr"] for x in mine})
        assert len(lrs) >= 2  # a real choice
        val = {lr: [x for x in mine if x["lr"] == lr] for lr in lrs}
        if r["task"] == "gpt-bytes":
            best = min(lrs, key=lambda lr: sum(x["val_loss"] for x in val[lr]))
        else:
            best = max(lrs, key=lambda lr: (sum(x["val_acc"] for x in val[lr]), -sum(x["val_loss"] for x in val[lr])))
        assert r["lr"] == best, (r["task"], r["method"], r["K"])
        assert set(r["val_by_lr"]) == {str(lr) for lr in lrs}


def test_choose_lr_ignores_test() -> None:
    from dist_train.bench.local_methods import choose_lr

    runs = [{"lr": 1e-3, "seed": s, "val_acc": 0.9, "val_loss": 0.3, "test_acc": 0.5, "test_loss": 2.0} for s in (0, 1)]
    runs += [{"lr": 1e-2, "seed": s, "val_acc": 0.8, "val_loss": 0.5, "test_acc": 0.99, "test_loss": 0.1} for s in (0, 1)]
    assert choose_lr(runs, lm=False)[0] == 1e-3
    assert choose_lr(runs, lm=True)[0] == 1e-3
    # ties in accuracy go to the lower validation loss; a failed seed rules its lr out
    runs[2]["val_acc"] = runs[3]["val_acc"] = 0.9
    runs[2]["val_loss"] = runs[3]["val_loss"] = 0.1
    assert choose_lr(runs, lm=False)[0] == 1e-2
    runs[3] = {"lr": 1e-2, "seed": 1, "error": "UserError: no"}
    lr, by_lr = choose_lr(runs, lm=False)
    assert lr == 1e-3 and set(by_lr) == {1e-3}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", ["cnn", "gpt"])
def test_bp_reference_equals_the_bp_loop(tmp_path: Path, model: str) -> None:
    """The benchmark's BP rows run `local_reference` with parallel.stages=1; it is the framework's
    end-to-end loop `dist_train.train.loop.train` (backend none), step for step and at evaluation."""
    from dist_train.bench.local_methods import _config, method_overrides
    from dist_train.runtime import discover, init_distributed
    from dist_train.train.local_reference import local_reference
    from dist_train.train.loop import train

    if model == "cnn":
        task = ["model.name=cnn", "model.n_layer=4", "model.width=8", "data.name=digits", "data.val_fraction=0.2",
                "data.test_fraction=0.2", "train.batch_size=16"]
    else:
        task = ["model.name=gpt", "model.n_layer=2", "model.width=16", "model.n_head=2", "model.block_size=8",
                "data.name=stdlib_bytes", "data.max_bytes=100000", "train.batch_size=8"]
    overrides = [*task, *method_overrides("bp", 1), "train.steps=6", "optim.warmup_steps=2", "optim.lr=1e-2",
                 "train.eval_batches=2", "train.log_every=1", "parallel.backend=none", "train.seed=3",
                 f"run.dir={tmp_path}", "run.name=bp"]
    ref = local_reference(_config(overrides))
    cfg = _config(overrides)
    last = train(cfg, init_distributed(cfg, discover({})), ["test"])
    logged = [json.loads(line) for line in (tmp_path / "bp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == pytest.approx(ref["losses"][0], rel=1e-6)
    assert last["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6)
    if model == "cnn":
        assert last["val_acc"] == pytest.approx(ref["val_acc"])
        assert 0.0 <= ref["test_acc"] <= 1.0
    assert ref["losses"][0][0] != pytest.approx(ref["losses"][0][-1], rel=1e-3)  # not vacuous: it trains


def test_stage_windows_weighs_windows_by_time() -> None:
    from dist_train.bench.local_methods import stage_windows

    recs = [{"step": 10, "samples_per_s": 100.0, "idle_fraction": 0.5},
            {"step": 20, "samples_per_s": 200.0, "idle_fraction": 0.0, "replays": 3},
            {"step": 30, "samples_per_s": 100.0, "idle_fraction": 0.5, "replays": 5}]
    w = stage_windows(recs, warmup=10, batch=10)  # windows 2 (0.5 s) and 3 (1 s)
    assert w["samples_s"] == pytest.approx(200 / 1.5)
    assert w["idle"] == pytest.approx(0.5 / 1.5)
    assert w["busy_s_step"] == pytest.approx(1.0 / 20)
    assert w["replays"] == 5

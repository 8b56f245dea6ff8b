"""Energy telemetry in real multi-process runs, against the stand-in pynvml of tests/stand_in (this
machine has no GPU; the same code reads a real GPU in test_energy_gpu.py when one is present).

* 2 DDP ranks on two stand-in GPUs of 50 W and 60 W: per-rank figures, the world total, J/sample and
  J/token, GPU statistics in metrics.jsonl and TensorBoard, the running total, energy.json with kWh
  and CO2 from the configured grid intensity, and the total carried across a resume.
* GPUs without the energy counter: the power-sampling fallback, and one GPU shared by both ranks
  counted once.
* No source: nulls and an energy.json that says "not measured"; a forced source that cannot be
  read: one line, exit 2, nothing written.

Tolerance: the stand-in's counter follows the wall clock, so a window's power is its watts within 10%
(the meter's clock and the counter's are read apart: a rank descheduled between them on a loaded
machine shifts a window of a few hundred ms by a few per cent; 50 W and 60 W stay distinguishable).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from cli_helpers import CLI, clean_env, forked_run

STAND_IN = Path(__file__).parent / "stand_in"
BATCH, BLOCK, LOG_EVERY = 8, 16, 2
TINY = ["model.n_layer=2", "model.width=32", "model.n_head=2", f"model.block_size={BLOCK}", "data.max_bytes=200000",
        f"train.batch_size={BATCH}", f"train.log_every={LOG_EVERY}", "train.eval_batches=1", "train.sample_tokens=0",
        "runtime.threads=1", 'telemetry.progress="off"', "parallel.stages=1", "parallel.backend=ddp"]


def _env(**env: str) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(STAND_IN), os.environ.get("PYTHONPATH", "")]), **env}


def _launch(tmp_path: Path, name: str, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "launch", "quickstart.yaml", "--nproc", "2", f"run.dir={tmp_path}",
                           f"run.name={name}", *TINY, *overrides],
                          capture_output=True, text=True, timeout=240, env=clean_env(**_env(**env)))


def _forked(tmp_path: Path, name: str, *overrides: str, **env: str) -> str:
    """The ranks of `_launch` forked from the fork server (the stand-in imported as pynvml there
    too); rank 0's output. For the runs whose ranks' figures are checked, not the launcher's exit."""
    return forked_run(["quickstart.yaml", f"run.dir={tmp_path}", f"run.name={name}", *TINY, *overrides], tmp_path,
                      nproc=2, env=_env(**env), timeout=240)


def _rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "energy_source" in r]


@pytest.mark.slow
def test_ddp_ranks_on_two_gpus_per_rank_world_total_summary_and_resume(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _forked(tmp_path, "two", "train.steps=6", "telemetry.energy=nvml", "telemetry.grid_intensity_g_per_kwh=400")
    run = tmp_path / "two"
    rows = _rows(run)
    assert [r["step"] for r in rows] == [2, 4, 6]
    total = 0.0
    for r in rows:
        assert r["energy_source"] == "nvml"
        assert r["power_rank_w"] == [pytest.approx(50.0, rel=0.1), pytest.approx(60.0, rel=0.1)]
        assert r["energy_j"] == pytest.approx(sum(r["energy_rank_j"]), rel=1e-12)  # two GPUs: both count
        assert r["power_w"] == pytest.approx(110.0, rel=0.1)
        samples = LOG_EVERY * BATCH
        assert r["joules_per_sample"] == pytest.approx(r["energy_j"] / samples, rel=1e-12)
        assert r["joules_per_step"] == pytest.approx(r["energy_j"] / LOG_EVERY, rel=1e-12)
        assert r["joules_per_token"] == pytest.approx(r["energy_j"] / (samples * BLOCK), rel=1e-12)
        assert r["tokens_per_j"] == pytest.approx(samples * BLOCK / r["energy_j"], rel=1e-12)
        assert (r["gpu_util_pct"], r["gpu_temp_c"], r["gpu_mem_used_bytes"]) == (40.5, 61.0, 2.0 * 2**30)
        assert r["gpu_temp_rank_c"] == [60.0, 61.0]
        total += r["energy_j"]
        assert r["energy_total_j"] == pytest.approx(total, rel=1e-12)
        assert r["tflops_per_device"] > 0 and r["mfu"] is None  # CPU: achieved FLOP/s, but no peak to divide by
    summary = json.loads((run / "energy.json").read_text())
    assert summary["energy_total_j"] == pytest.approx(total, rel=1e-12)
    assert summary["energy_kwh"] == pytest.approx(total / 3.6e6, rel=1e-12)
    assert summary["co2_g"] == pytest.approx(total / 3.6e6 * 400, rel=1e-12)
    assert summary["joules_per_sample"] == pytest.approx(total / (6 * BATCH), rel=1e-12)
    assert "energy:" in out and "g CO2 at 400 g/kWh" in out
    assert json.loads((run / "provenance.json").read_text())["extra"]["energy"]["source"] == "nvml"

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"energy/energy_j", "energy/joules_per_token", "energy/rank0_j", "energy/rank1_j", "energy/rank1_w",
            "gpu/rank0_util_pct", "gpu/rank1_temp_c", "energy/energy_total_j"} <= tags
    assert [e.value for e in acc.Scalars("gpu/rank1_temp_c")] == [61.0] * 3

    # Resume to step 10: the total covers the whole run as recorded (the first 6 steps once).
    _forked(tmp_path, "two", "train.steps=10", "telemetry.energy=nvml")
    rows = _rows(run)
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]
    summary = json.loads((run / "energy.json").read_text())
    assert summary["energy_total_j"] == pytest.approx(sum(r["energy_j"] for r in rows), rel=1e-12)
    assert rows[-1]["energy_total_j"] == pytest.approx(summary["energy_total_j"], rel=1e-12)
    assert summary["energy_windows"] == 5 and summary["co2_g"] is None  # no grid intensity this time


@pytest.mark.slow
def test_power_sampling_fallback_and_a_shared_gpu_counted_once(tmp_path: Path) -> None:
    _forked(tmp_path, "shared", "train.steps=4", "telemetry.energy=nvml", STAND_IN_NVML_COUNTER="0",
            STAND_IN_NVML_SHARED="1")
    rows = _rows(tmp_path / "shared")
    for r in rows:
        assert r["energy_source"] == "nvml-power"
        # Both ranks read GPU 0 (50 W); the world figure counts it once.
        assert r["power_rank_w"] == [pytest.approx(50.0, rel=0.05)] * 2
        assert r["power_w"] == pytest.approx(50.0, rel=0.05) and r["energy_j"] == r["energy_rank_j"][0]


@pytest.mark.slow
def test_no_gpu_source_writes_nulls_or_rapl_measurements(tmp_path: Path) -> None:
    """NVML absent: `auto` falls to RAPL where its counters are readable (then the CPU packages are
    measured), else to `unavailable` with nulls everywhere — never a made-up number."""
    _forked(tmp_path, "none", "train.steps=2", "telemetry.energy=auto", "telemetry.grid_intensity_g_per_kwh=400",
            STAND_IN_NVML_INIT="0")
    rows = _rows(tmp_path / "none")
    summary = json.loads((tmp_path / "none" / "energy.json").read_text())
    assert "NVML could not start" in summary["energy_detail"] or rows[0]["energy_source"] == "rapl"
    if rows[0]["energy_source"] == "rapl":  # readable RAPL counters: the node is measured, counted once
        for r in rows:
            assert r["energy_source"] == "rapl" and r["energy_j"] >= 0 and "gpu_util_pct" not in r
        assert summary["co2_g"] == pytest.approx(summary["energy_kwh"] * 400, rel=1e-12)
        return
    for r in rows:
        assert r["energy_source"] == "unavailable"
        for key in ("energy_j", "power_w", "joules_per_sample", "joules_per_token", "energy_total_j"):
            assert r[key] is None, key
        assert r["energy_rank_j"] == [None, None]
    assert summary["energy_total_j"] is None and summary["co2_g"] is None


def test_forced_nvml_without_a_gpu_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = _launch(tmp_path, "forced", "train.steps=2", "telemetry.energy=nvml", STAND_IN_NVML_INIT="0")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["dist-train: error: telemetry.energy: energy source 'nvml' requested but unavailable: "
                     "NVML could not start (NVML Shared Library Not Found); no NVIDIA driver?"], proc.stderr
    assert not (tmp_path / "forced").exists()

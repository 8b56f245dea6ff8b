"""Energy telemetry in a local-learning pipeline, against a stand-in pynvml (this machine has no GPU;
the real NVML path is the same code, checked on a GPU machine when one is available).

Both stages of a 2-rank CPU run read the same stand-in GPU, as several stages sharing one card would:
each stage reports that GPU's energy over its own windows, and the run's total counts the GPU once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cli_helpers import forked_run

WATTS = 50.0

# A pynvml-shaped module: one GPU whose cumulative energy counter (mJ) grows at WATTS from the
# system-wide monotonic clock (the meter's own clock), so every process reads the same device
# consistently. Each read first sleeps 0.2 s: the meter reads the counter and then its clock, and a
# window of a few ms (this model's steps) lets a ms of scheduler preemption between the two reads
# (a loaded 2-core CI machine) move the measured power by 30%; in a window of >= 0.2 s it is ~1%.
FAKE_PYNVML = f'''
import time
def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlDeviceGetCount(): return 1
def nvmlDeviceGetHandleByIndex(i): return "gpu%d" % i
def nvmlDeviceGetUUID(h): return "GPU-stand-in-0"
def nvmlDeviceGetTotalEnergyConsumption(h):
    time.sleep(0.2)
    return int(time.monotonic() * 1000 * {WATTS})
def nvmlDeviceGetPowerUsage(h): return int({WATTS} * 1000)
'''

TINY = ["model.n_layer=2", "model.width=32", "model.n_head=2", "model.block_size=16", "data.max_bytes=200000",
        "train.batch_size=8", "train.steps=6", "train.log_every=2", "train.eval_batches=1",
        "checkpoint.at_end=false", "parallel.stages=2", "telemetry.energy=nvml",
        "train.sample_tokens=0"]  # the quickstart generates 200 tokens through the stages after training


def _run(tmp_path: Path, name: str, pynvml_dir: Path) -> None:
    """The 2 ranks `dist-train launch --nproc 2 --threads 1` would start, forked from the fork server,
    with the pynvml of `pynvml_dir` in place of the installed one."""
    env = {"PYTHONPATH": os.pathsep.join([str(pynvml_dir), os.environ.get("PYTHONPATH", "")])}
    forked_run(["quickstart.yaml", f"run.dir={tmp_path}", f"run.name={name}", *TINY], tmp_path, nproc=2, env=env,
               timeout=240)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_pipeline_meters_energy_per_stage_and_counts_a_shared_gpu_once(tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "pynvml.py").write_text(FAKE_PYNVML)
    _run(tmp_path, "energy", fake)
    run = tmp_path / "energy"
    stages = [_records(run / "stages" / f"stage{k}" / "metrics.jsonl") for k in range(2)]
    main = _records(run / "metrics.jsonl")
    assert [r["step"] for r in main] == [2, 4, 6]
    for k, recs in enumerate(stages):
        for r in recs:
            assert r["energy_source"] == "nvml"
            # Each window's energy is the stand-in's power times the window's wall time.
            assert r["power_w"] == pytest.approx(WATTS, rel=0.05), (k, r)
            assert r["energy_j"] > 0
    for row, s0, s1 in zip(main, *stages):
        assert row["energy_source"] == "nvml"
        assert row["stage0_energy_j"] == s0["energy_j"] and row["stage1_energy_j"] == s1["energy_j"]
        # One GPU shared by both stages: counted once (by the first rank that reads it), not twice.
        assert row["energy_j"] == s0["energy_j"] and row["power_w"] == pytest.approx(WATTS, rel=0.05)
        # Every stage trains every example: the job's J/sample is its energy over the window's samples.
        assert row["joules_per_sample"] == pytest.approx(row["energy_j"] / (2 * 8), rel=1e-12)
        assert row["joules_per_step"] == pytest.approx(row["energy_j"] / 2, rel=1e-12)
        assert row["joules_per_token"] == pytest.approx(row["energy_j"] / (2 * 8 * 16), rel=1e-12)
        assert s1["joules_per_sample"] == pytest.approx(s1["energy_j"] / (2 * 8), rel=1e-12)  # per stage
    summary = json.loads((run / "energy.json").read_text())
    assert summary["energy_total_j"] == pytest.approx(sum(r["energy_j"] for r in main), rel=1e-12)
    assert main[-1]["energy_total_j"] == pytest.approx(summary["energy_total_j"], rel=1e-12)


@pytest.mark.slow
def test_pipeline_row_has_gpu_stats_and_the_whole_models_flops(tmp_path):
    """Two stages on two (stand-in) GPUs: the run's row takes GPU utilisation as the mean over the
    stages (40 and 41 %), memory and temperature as the largest (2 GiB, 61 C); its achieved FLOP/s
    count the whole model's training FLOPs (not one stage's), over both devices; MFU is None on CPU."""
    from dist_train.config import load_config
    from dist_train.data import build_dataset
    from dist_train.models import build_model

    stand_in = Path(__file__).parent / "stand_in"
    _run(tmp_path, "stats", stand_in)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", TINY)
    model = build_model(cfg.model, build_dataset(cfg.data, cfg.model.block_size).info)
    flops = model.num_flops_per_token()
    main = _records(tmp_path / "stats" / "metrics.jsonl")
    assert [r["step"] for r in main] == [2, 4, 6]
    for row in main:
        assert row["gpu_util_pct"] == pytest.approx(40.5)
        assert row["gpu_mem_used_bytes"] == 2 * 2**30 and row["gpu_temp_c"] == 61
        assert row["tflops_per_device"] == pytest.approx(flops * row["tokens_per_s"] / 2 / 1e12, rel=1e-9)
        assert row["mfu"] is None

"""`dist-train bench energy` at the smoke size: both sides train (the on-side through the NVML path,
a stand-in pynvml where there is no GPU), the energy windows are clocked, and the target and the
direct figure are in the document (nothing here asserts a target: it is a measurement)."""

from __future__ import annotations

import pytest

from dist_train.bench.energy import run, stand_in_pynvml
from dist_train.bench.report import SIZE_ENV


@pytest.mark.slow
def test_smoke_document(monkeypatch):
    monkeypatch.setenv(SIZE_ENV, "smoke")
    doc = run(quick=True)
    assert doc["name"] == "energy" and doc["provenance"]
    (target,) = doc["targets"]
    assert target["metric"] == "energy_telemetry_overhead" and target["value"] > 0
    repeat, median = doc["results"]
    assert repeat["on_source"] == "nvml" and repeat["on_step_ms"] > 0 and repeat["off_step_ms"] > 0
    assert repeat["window_ms"] > 0 and 0 < repeat["window_share_of_step_time"] < 1
    assert median["ratio"] == repeat["ratio"]


def test_stand_in_counter_follows_the_clock():
    import time

    nvml = stand_in_pynvml(watts=100.0)
    a = nvml.nvmlDeviceGetTotalEnergyConsumption(0)
    time.sleep(0.05)
    b = nvml.nvmlDeviceGetTotalEnergyConsumption(0)
    assert 100.0 * 0.04 * 1000 < b - a < 100.0 * 0.5 * 1000  # mJ at 100 W over ~0.05 s

"""EnergyLog and EnergyTotals against figures computed by hand: one rank's window (J/sample, J/token,
samples/J), the group sum that counts a shared device once, an unknown reading that makes the sum
unknown instead of smaller, GPU statistics through a stand-in NVML, the running total across a
resume and the end-of-run summary (kWh; CO2 only with a configured grid intensity).

The multi-process aggregation over real gloo ranks is in test_energy_runs.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dist_train.telemetry.energy import EnergyMeter, _nvml_stats
from dist_train.telemetry.energy_log import EnergyLog, EnergyTotals, derived, per_rank_scalars, summary_line


class ScriptedMeter(EnergyMeter):
    """A meter whose windows read the given (J, W) pairs in turn."""

    def __init__(self, reads, source="nvml", scope="gpu", stats=None):
        super().__init__(detail="scripted")
        self.reads, self.source, self.scope, self.device_key = list(reads), source, scope, "GPU-0"
        self.stats = stats or {}

    def read(self):
        return self.reads.pop(0)

    def device_stats(self):
        return dict(self.stats)


def _table(rows):
    return torch.tensor([[math.nan if v is None else v for v in r] for r in rows], dtype=torch.float64)


def test_one_rank_window_and_derived_figures() -> None:
    log = EnergyLog(ScriptedMeter([(120.0, 60.0)], stats={"gpu_util_pct": 75.0, "gpu_mem_used_bytes": 3e9,
                                                           "gpu_temp_c": 64.0}))
    w = log.window(samples=32, tokens_per_sample=64)
    assert w["energy_j"] == 120.0 and w["power_w"] == 60.0
    assert w["joules_per_sample"] == pytest.approx(120.0 / 32)
    assert w["samples_per_j"] == pytest.approx(32 / 120.0)
    assert w["joules_per_token"] == pytest.approx(120.0 / (32 * 64))
    assert w["tokens_per_j"] == pytest.approx(32 * 64 / 120.0)
    assert w["energy_rank_j"] == [120.0] and w["power_rank_w"] == [60.0]
    assert (w["gpu_util_pct"], w["gpu_mem_used_bytes"], w["gpu_temp_c"]) == (75.0, 3e9, 64.0)
    assert w["energy_source"] == "nvml"


def test_classification_has_no_token_figures_and_zero_energy_no_rate() -> None:
    w = EnergyLog(ScriptedMeter([(0.0, 0.0)])).window(samples=8, tokens_per_sample=1)
    assert "joules_per_token" not in w and w["joules_per_sample"] == 0.0 and w["samples_per_j"] is None


def test_unavailable_is_null_everywhere() -> None:
    w = EnergyLog(EnergyMeter(detail="nothing readable")).window(samples=8, tokens_per_sample=16)
    assert w["energy_source"] == "unavailable"
    for key in ("energy_j", "power_w", "joules_per_sample", "samples_per_j", "joules_per_token", "tokens_per_j"):
        assert w[key] is None, key
    assert "gpu_util_pct" not in w  # no NVML, no GPU statistics


def test_group_counts_a_shared_device_once_and_unknown_is_unknown() -> None:
    log = EnergyLog(ScriptedMeter([]))
    # ranks 0 and 1 read one GPU (rank 0 counts it), rank 2 its own; rank 1 is first in world for nothing.
    table = _table([[10.0, 100.0, 1, 1, 50, 1e9, 60],
                    [10.0, 100.0, 0, 0, 50, 1e9, 60],
                    [4.0, 40.0, 1, 0, 30, 2e9, 70]])
    w = log._figures(table, samples=14, tokens_per_sample=1)
    assert w["energy_j"] == 14.0 and w["power_w"] == 140.0  # first in the group: ranks 0 and 2
    assert w["energy_j_counted"] == 10.0  # rank 2's GPU was counted by another stage first
    assert w["joules_per_sample"] == pytest.approx(1.0)
    assert w["energy_rank_j"] == [10.0, 10.0, 4.0]
    assert w["gpu_util_pct"] == pytest.approx(130 / 3) and w["gpu_mem_used_bytes"] == 2e9 and w["gpu_temp_c"] == 70
    # A counting rank that could not read its meter: the sum is unknown, not 4 J.
    table[0, 0] = math.nan
    w = log._figures(table, samples=14, tokens_per_sample=1)
    assert w["energy_j"] is None and w["joules_per_sample"] is None and w["energy_rank_j"][0] is None
    # A rank that does not count (its device is read by another) may be unknown without harm.
    table[0, 0], table[1, 0] = 10.0, math.nan
    assert log._figures(table, samples=14, tokens_per_sample=1)["energy_j"] == 14.0


def test_per_rank_scalars_name_each_rank() -> None:
    row = {"energy_rank_j": [1.0, None], "power_rank_w": [2.0, 3.0], "gpu_temp_rank_c": [60.0, 61.0]}
    assert per_rank_scalars(row, [4, 5]) == {"energy/rank4_j": 1.0, "energy/rank4_w": 2.0, "energy/rank5_w": 3.0,
                                             "gpu/rank4_temp_c": 60.0, "gpu/rank5_temp_c": 61.0}


class FakeNvml:
    NVML_TEMPERATURE_GPU = 0

    class _Util:
        gpu = 87

    class _Mem:
        used = 5 * 2**30

    def nvmlDeviceGetUtilizationRates(self, h):
        return self._Util()

    def nvmlDeviceGetMemoryInfo(self, h):
        return self._Mem()

    def nvmlDeviceGetTemperature(self, h, sensor):
        if sensor != 0:
            raise AssertionError("the die sensor is NVML_TEMPERATURE_GPU = 0")
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")


def test_nvml_stats_reads_and_marks_unsupported_fields_unknown() -> None:
    assert _nvml_stats(FakeNvml(), "h") == {"gpu_util_pct": 87.0, "gpu_mem_used_bytes": 5.0 * 2**30,
                                             "gpu_temp_c": None}
    assert _nvml_stats(None, "h") == {}


def test_totals_resume_summary_and_co2_only_with_grid_intensity(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"step": 2, "energy_j": 1800.0, "energy_source": "nvml"},
        {"step": 4, "energy_j": None, "energy_source": "nvml"},  # a window the meter missed
        {"step": 4, "val_loss": 1.0},  # not a training window
    ]) + "\n")
    totals = EnergyTotals(grid_g_per_kwh=400.0).resume_from(metrics)
    assert totals.add(1800.0) == 3600.0
    s = totals.summary("nvml", "counter", samples=600, tokens_per_sample=1)
    assert s["energy_total_j"] == 3600.0 and s["energy_kwh"] == pytest.approx(0.001)
    assert s["co2_g"] == pytest.approx(0.4)  # 0.001 kWh x 400 g/kWh
    assert (s["energy_windows"], s["energy_unknown_windows"]) == (3, 1)
    assert s["joules_per_sample"] == pytest.approx(6.0)
    assert "0.4 g CO2 at 400 g/kWh" in summary_line(s) and "1 of 3 windows unmeasured" in summary_line(s)
    no_grid = EnergyTotals().resume_from(metrics).summary("nvml", "counter", samples=600, tokens_per_sample=1)
    assert no_grid["co2_g"] is None and no_grid["energy_kwh"] == pytest.approx(0.0005)


def test_totals_never_report_energy_that_was_not_measured() -> None:
    totals = EnergyTotals(grid_g_per_kwh=400.0)
    assert totals.add(None) is None and totals.add(None) is None
    s = totals.summary("unavailable", "no NVML, no RAPL", samples=10, tokens_per_sample=4)
    assert s["energy_total_j"] is None and s["energy_kwh"] is None and s["co2_g"] is None
    assert s["joules_per_token"] is None
    assert summary_line(s).startswith("energy: not measured (unavailable: no NVML, no RAPL)")


def test_derived_handles_an_empty_window_and_counts_steps() -> None:
    assert derived(5.0, 0, 1) == {"joules_per_sample": None, "samples_per_j": None}
    assert derived(6.0, 12, 1, steps=3)["joules_per_step"] == 2.0

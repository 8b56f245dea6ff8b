"""The real NVML path on real hardware: skipped, with the reason, where there is no NVIDIA GPU.

A second of matrix multiplies must read as energy > 0 at a power between an idle card's and any
GPU's limit, the counter method must be the one chosen on Volta and newer, and the GPU statistics
must be plausible. (Everything else about the NVML path runs everywhere against tests/stand_in.)
"""

from __future__ import annotations

import time

import pytest
import torch

from dist_train.telemetry import make_energy_meter


def _real_gpu() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except Exception as e:  # no driver library, or nvidia-ml-py missing
        return f"NVML unavailable ({e})"
    return ""


@pytest.mark.skipif(bool(_real_gpu()), reason=f"real-hardware check: {_real_gpu() or 'GPU present'}")
def test_nvml_measures_a_second_of_matmuls() -> None:
    meter = make_energy_meter("nvml", device_index=torch.cuda.current_device())
    assert meter.source in ("nvml", "nvml-power")
    a = torch.randn(4096, 4096, device="cuda")
    meter.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0:
        a = torch.tanh(a @ a)
    torch.cuda.synchronize()
    energy, power = meter.read()
    stats = meter.device_stats()
    meter.close()
    assert energy is not None and energy > 0
    assert 10.0 < power < 1500.0, power
    assert 0 <= stats["gpu_util_pct"] <= 100 and stats["gpu_mem_used_bytes"] > 4096 * 4096 * 4
    assert 0 < stats["gpu_temp_c"] < 120

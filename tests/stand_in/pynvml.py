"""A pynvml-shaped stand-in for tests on machines without a GPU (put this folder on PYTHONPATH).

Each rank sees "its own" GPU, numbered by the RANK variable, or all ranks one shared GPU 0 when
STAND_IN_NVML_SHARED=1. GPU g draws 50 + 10 g watts: its cumulative energy counter (mJ) grows at that
rate from the wall clock, so every process reading one GPU sees the same counter. With
STAND_IN_NVML_COUNTER=0 the counter answers NOT_SUPPORTED (pre-Volta), forcing the power-sampling
fallback; with STAND_IN_NVML_INIT=0 NVML does not start (no driver).
Utilisation 40 + g %, memory in use (1 + g) GiB, temperature 60 + g C.
"""

import os
import time

NVML_TEMPERATURE_GPU = 0
_GPU = 0 if os.environ.get("STAND_IN_NVML_SHARED") == "1" else int(os.environ.get("RANK", "0"))


class NVMLError(Exception):
    pass


def watts(gpu: int) -> float:
    return 50.0 + 10.0 * gpu


def nvmlInit():
    if os.environ.get("STAND_IN_NVML_INIT") == "0":
        raise NVMLError("NVML Shared Library Not Found")


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return 8


def nvmlDeviceGetHandleByIndex(index):
    return _GPU


def nvmlDeviceGetUUID(handle):
    return f"GPU-stand-in-{handle}"


def nvmlDeviceGetTotalEnergyConsumption(handle):
    if os.environ.get("STAND_IN_NVML_COUNTER") == "0":
        raise NVMLError("Not Supported")
    return int(time.time() * 1000 * watts(handle))


def nvmlDeviceGetPowerUsage(handle):
    return int(watts(handle) * 1000)


class _Utilization:
    def __init__(self, gpu):
        self.gpu, self.memory = gpu, 0


class _Memory:
    def __init__(self, used):
        self.used, self.total = used, 80 * 2**30


def nvmlDeviceGetUtilizationRates(handle):
    return _Utilization(40 + handle)


def nvmlDeviceGetMemoryInfo(handle):
    return _Memory((1 + handle) * 2**30)


def nvmlDeviceGetTemperature(handle, sensor):
    return 60 + handle

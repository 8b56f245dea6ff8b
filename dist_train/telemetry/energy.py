"""Energy meters read at logging-window boundaries.

A meter answers one question: how many joules did this window cost, and at what average power?
`start()` opens the first window; each `read()` closes the current window and opens the next.

Sources, in the order "auto" tries them:

* ``nvml``        GPU cumulative energy counter (`nvmlDeviceGetTotalEnergyConsumption`, Volta+):
                  two reads per window, exact, nearly free.
* ``nvml-power``  older GPUs without the counter: a daemon thread samples instantaneous power
                  (`nvmlDeviceGetPowerUsage`) and integrates it (trapezoid rule).
* ``rapl``        no GPU: Intel/AMD RAPL package counters under /sys/class/powercap. Note that
                  RAPL measures the whole CPU package(s), i.e. every process on the node.
* ``unavailable`` nothing readable: `read()` returns (None, None).

Numbers are measured or absent, never estimated (no TDP x utilisation): a wrong energy figure
is worse than a missing one. `scope` tells the caller how to aggregate across ranks: "gpu"
readings are per device (sum over ranks), "node" readings are per machine (take one per node,
e.g. local rank 0, or summing would count the node once per rank).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional

EnergySource = Literal["auto", "nvml", "rapl", "none"]
Reading = tuple[Optional[float], Optional[float]]  # (energy_j, power_w)

DEFAULT_RAPL_ROOT = Path("/sys/class/powercap")
# Top-level zones only: "intel-rapl:0" is a package, "intel-rapl:0:0" is one of its subzones
# (core, uncore, dram) whose energy is already inside the package figure. AMD Zen CPUs use the
# same driver and naming. "intel-rapl-mmio:0" mirrors package 0 through MMIO and is excluded too.
_TOP_LEVEL_ZONE = re.compile(r"^intel-rapl:\d+$")


class EnergyMeter:
    """Base class and the "unavailable" meter: every read is (None, None)."""

    source: str = "unavailable"
    scope: Optional[str] = None  # "gpu", "node", or None when nothing is measured
    # Which device a "gpu" meter reads (its NVML UUID, else its index): two ranks sharing one GPU
    # (several pipeline stages on one card) must not both count it in a job's total.
    device_key: Optional[str] = None

    def __init__(self, detail: str = "") -> None:
        # Why no energy is reported (or what is measured); the trainer logs it once at start.
        self.detail = detail

    def start(self) -> None:
        """Open the first window (call once, right before the first timed step)."""

    def read(self) -> Reading:
        """Close the current window and open the next; returns (energy_j, power_w) of the window."""
        return None, None

    def close(self) -> None:
        """Release the library handle / stop the sampling thread. Safe to call twice."""

    def device_stats(self) -> dict[str, Optional[float]]:
        """GPU utilisation (%), memory in use (bytes) and temperature (C) now; {} without NVML."""
        return {}

    def __enter__(self) -> "EnergyMeter":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------- NVML


class NvmlCounterMeter(EnergyMeter):
    """Difference of the GPU's cumulative millijoule counter between window boundaries."""

    source = "nvml"
    scope = "gpu"

    def __init__(self, nvml: Any, handle: Any, detail: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(detail)
        self._nvml, self._handle, self._clock = nvml, handle, clock
        self._last_mj: Optional[int] = None
        self._last_t = 0.0

    def start(self) -> None:
        self._last_mj, self._last_t = self._counter_mj(), self._clock()

    def read(self) -> Reading:
        now_mj, now_t = self._counter_mj(), self._clock()
        prev_mj, prev_t = self._last_mj, self._last_t
        self._last_mj, self._last_t = now_mj, now_t
        # A failed read or a counter that went backwards (driver reload) makes this window
        # unknown; the next window is measured normally from the fresh baseline.
        if now_mj is None or prev_mj is None or now_mj < prev_mj:
            return None, None
        energy_j = (now_mj - prev_mj) / 1000.0
        dt = now_t - prev_t
        return energy_j, (energy_j / dt if dt > 0 else None)

    def close(self) -> None:
        _nvml_shutdown(self._nvml)
        self._nvml = None

    def device_stats(self) -> dict[str, Optional[float]]:
        return _nvml_stats(self._nvml, self._handle)

    def _counter_mj(self) -> Optional[int]:
        if self._nvml is None:
            return None
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:
            # Telemetry must never kill a training run; a transient NVML error costs one window.
            return None


class PowerIntegrator:
    """Integrates a power signal (watts) sampled on a daemon thread; trapezoid rule.

    Separate from NVML so the integration can be tested with any `sample_w` callable.
    """

    def __init__(self, sample_w: Callable[[], float], interval_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sample_w, self._interval_s, self._clock = sample_w, interval_s, clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._energy_j = 0.0
        self._window_t: Optional[float] = None  # time of the window's first sample
        self._last: Optional[tuple[float, float]] = None  # (t, watts) of the latest sample

    def start(self) -> None:
        with self._lock:
            self._energy_j, self._last, self._window_t = 0.0, None, None
            self._sample_locked()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="dist-train-power-sampler", daemon=True)
            self._thread.start()

    def read(self) -> Reading:
        with self._lock:
            # A sample exactly at the boundary makes the window end here, not at the last tick.
            self._sample_locked()
            if self._last is None or self._window_t is None:
                return None, None
            end_t = self._last[0]
            energy_j, dt = self._energy_j, end_t - self._window_t
            # The boundary sample is shared: it ends this window and starts the next one.
            self._energy_j, self._window_t = 0.0, end_t
        if dt <= 0:
            return None, None
        return energy_j, energy_j / dt

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self._interval_s + 1.0)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            with self._lock:
                self._sample_locked()

    def _sample_locked(self) -> None:
        try:
            watts = float(self._sample_w())
        except Exception:
            # A missed sample is bridged by the trapezoid between its neighbours.
            return
        t = self._clock()
        if self._last is not None:
            t0, w0 = self._last
            self._energy_j += 0.5 * (w0 + watts) * (t - t0)
        if self._window_t is None:
            self._window_t = t
        self._last = (t, watts)


class NvmlPowerMeter(EnergyMeter):
    """Fallback for GPUs without the energy counter: integrated power samples."""

    source = "nvml-power"
    scope = "gpu"

    def __init__(self, nvml: Any, handle: Any, detail: str = "", interval_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(detail)
        self._nvml, self._handle = nvml, handle
        # nvmlDeviceGetPowerUsage reports milliwatts.
        self._integrator = PowerIntegrator(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, interval_s, clock)

    def start(self) -> None:
        self._integrator.start()

    def read(self) -> Reading:
        return self._integrator.read()

    def close(self) -> None:
        self._integrator.close()
        _nvml_shutdown(self._nvml)
        self._nvml = None

    def device_stats(self) -> dict[str, Optional[float]]:
        return _nvml_stats(self._nvml, self._handle)


# nvmlDeviceGetTemperature's sensor argument: NVML_TEMPERATURE_GPU (the die), 0 in every NVML release.
_NVML_TEMPERATURE_GPU = 0


def _nvml_stats(nvml: Any, handle: Any) -> dict[str, Optional[float]]:
    """Utilisation, memory in use and temperature; a field NVML cannot read is None."""
    if nvml is None:
        return {}
    reads = {"gpu_util_pct": lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
             "gpu_mem_used_bytes": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used,
             "gpu_temp_c": lambda: nvml.nvmlDeviceGetTemperature(
                 handle, getattr(nvml, "NVML_TEMPERATURE_GPU", _NVML_TEMPERATURE_GPU))}
    out: dict[str, Optional[float]] = {}
    for key, read in reads.items():
        try:
            out[key] = float(read())
        except Exception:  # NOT_SUPPORTED on some boards, or a transient error: that field is unknown
            out[key] = None
    return out


def _nvml_shutdown(nvml: Any) -> None:
    if nvml is None:
        return
    try:
        nvml.nvmlShutdown()
    except Exception:
        pass


def _nvml_handle(nvml: Any, device_index: Optional[int]) -> Any:
    """NVML handle of the GPU this process trains on.

    NVML enumerates all GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES, so CUDA device i is
    not necessarily NVML device i. When torch sees CUDA we map through the device UUID; otherwise
    (tests, or no torch CUDA) `device_index` is taken as the NVML index.
    """
    index = 0 if device_index is None else device_index
    try:
        import torch

        if torch.cuda.is_available():
            if device_index is None:
                index = torch.cuda.current_device()
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:
        pass  # fall through to the plain index
    return nvml.nvmlDeviceGetHandleByIndex(index)


def _open_nvml(nvml: Any, device_index: Optional[int], interval_s: float) -> tuple[Optional[EnergyMeter], str]:
    """(meter, "") when NVML can measure this GPU, else (None, reason)."""
    if nvml is None:
        try:
            import pynvml as nvml  # nvidia-ml-py
        except ImportError:
            return None, "pynvml (nvidia-ml-py) is not installed"
    try:
        nvml.nvmlInit()
    except Exception as e:
        return None, f"NVML could not start ({e}); no NVIDIA driver?"
    try:
        if nvml.nvmlDeviceGetCount() < 1:
            raise RuntimeError("no GPU found")
        handle = _nvml_handle(nvml, device_index)
    except Exception as e:
        _nvml_shutdown(nvml)
        return None, f"NVML sees no usable GPU ({e})"

    # Probe once: the counter exists on Volta and newer; older GPUs (or old pynvml without the
    # function) answer NOT_SUPPORTED / AttributeError, and we fall back to power sampling.
    try:
        key = str(nvml.nvmlDeviceGetUUID(handle))
    except Exception:
        key = f"index {0 if device_index is None else device_index}"
    meter: EnergyMeter
    try:
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        meter = NvmlCounterMeter(nvml, handle, detail="GPU cumulative energy counter")
        meter.device_key = key
        return meter, ""
    except Exception:
        pass
    try:
        nvml.nvmlDeviceGetPowerUsage(handle)
        meter = NvmlPowerMeter(nvml, handle, detail="GPU power sampled and integrated", interval_s=interval_s)
        meter.device_key = key
        return meter, ""
    except Exception as e:
        _nvml_shutdown(nvml)
        return None, f"the GPU reports neither energy nor power ({e})"


# ----------------------------------------------------------------------------------------- RAPL


class _RaplZone:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.max_uj = int((path / "max_energy_range_uj").read_text())

    def energy_uj(self) -> int:
        return int((self.path / "energy_uj").read_text())


class RaplMeter(EnergyMeter):
    """Sum of the CPU package counters; handles one counter wrap per window per package."""

    source = "rapl"
    scope = "node"

    def __init__(self, zones: list[_RaplZone], detail: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(detail)
        self._zones, self._clock = zones, clock
        self._last: Optional[list[int]] = None
        self._last_t = 0.0

    def start(self) -> None:
        self._last, self._last_t = self._read_all(), self._clock()

    def read(self) -> Reading:
        now, now_t = self._read_all(), self._clock()
        prev, prev_t = self._last, self._last_t
        self._last, self._last_t = now, now_t
        if now is None or prev is None:
            return None, None
        total_uj = 0
        for zone, before, after in zip(self._zones, prev, now):
            delta = after - before
            # The counter wraps to 0 after max_energy_range_uj (~262 kJ: minutes at full load).
            # More than one wrap in a window cannot be detected, so keep windows shorter than that.
            if delta < 0:
                delta += zone.max_uj
            total_uj += delta
        energy_j = total_uj / 1e6
        dt = now_t - prev_t
        return energy_j, (energy_j / dt if dt > 0 else None)

    def _read_all(self) -> Optional[list[int]]:
        try:
            return [z.energy_uj() for z in self._zones]
        except (OSError, ValueError):
            return None


def _open_rapl(root: Path) -> tuple[Optional[EnergyMeter], str]:
    zones: list[_RaplZone] = []
    for path in sorted(root.glob("intel-rapl:*")):
        if not _TOP_LEVEL_ZONE.match(path.name):
            continue
        try:
            name = (path / "name").read_text().strip() if (path / "name").exists() else "package"
            # "psys" (platform, laptops) already contains the packages: summing it double counts.
            if not name.startswith("package"):
                continue
            zone = _RaplZone(path)
            zone.energy_uj()  # since Linux 5.10 energy_uj is root-only by default (PLATYPUS)
            zones.append(zone)
        except (OSError, ValueError):
            continue
    if not zones:
        return None, f"no readable RAPL package counters under {root}"
    names = ", ".join(z.path.name for z in zones)
    return RaplMeter(zones, detail=f"CPU package counters ({names}); whole node, all processes"), ""


# -------------------------------------------------------------------------------------- factory


def make_energy_meter(
    source: EnergySource = "auto",
    device_index: Optional[int] = None,
    *,
    nvml: Any = None,
    rapl_root: Path | str = DEFAULT_RAPL_ROOT,
    sample_interval_s: float = 0.1,
) -> EnergyMeter:
    """Pick an energy meter.

    source:       "auto" (NVML if a GPU is found, else RAPL if readable, else unavailable),
                  "nvml", "rapl" (ValueError when not available), or "none".
    device_index: CUDA device this rank trains on (default: the current device, or NVML 0).
    nvml:         a pynvml-like module; None imports `pynvml`. Tests inject a fake here.
    rapl_root:    powercap sysfs directory; tests point it at a fake tree.
    """
    if source == "none":
        return EnergyMeter(detail="disabled (energy source 'none')")
    if source not in ("auto", "nvml", "rapl"):
        raise ValueError(f"unknown energy source {source!r}; expected auto, nvml, rapl or none")

    reasons: list[str] = []
    if source in ("auto", "nvml"):
        meter, why = _open_nvml(nvml, device_index, sample_interval_s)
        if meter is not None:
            return meter
        if source == "nvml":
            raise ValueError(f"energy source 'nvml' requested but unavailable: {why}")
        reasons.append(why)
    meter, why = _open_rapl(Path(rapl_root))
    if meter is not None:
        return meter
    if source == "rapl":
        raise ValueError(f"energy source 'rapl' requested but unavailable: {why}")
    reasons.append(why)
    return EnergyMeter(detail="; ".join(reasons))

"""Step time, throughput, peak memory and MFU.

Everything here returns None rather than a guess when the number cannot be measured (no clock
interval yet, unknown GPU, a dtype whose peak is ambiguous): a plausible-looking wrong MFU is
worse than a blank cell.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, Union

import torch

DeviceLike = Union[torch.device, str, int, None]

# Dense (no 2:4 sparsity) bf16/fp16 tensor-core peak per GPU, matched against
# torch.cuda.get_device_name(), most specific pattern first. Sources (NVIDIA datasheets, the dense
# figure, i.e. half the "with sparsity" one):
#   H100 SXM5 989.4 TFLOPS, H100 PCIe 756 TFLOPS: "NVIDIA H100 Tensor Core GPU" datasheet (2023);
#   H200 SXM 989 TFLOPS (same GH100 compute as H100 SXM): "NVIDIA H200 Tensor Core GPU" datasheet (2024);
#   A100 312 TFLOPS (SXM and PCIe): "NVIDIA A100 Tensor Core GPU" datasheet (2021).
# None marks variants whose peak differs and is not tabulated here (NVL parts run at other clocks):
# better no MFU than a wrong one.
PEAK_BF16_FLOPS: tuple[tuple[str, Optional[float]], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", None),
    ("H200 NVL", None),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),  # also GH200
    ("A100", 312e12),  # SXM and PCIe share the tensor peak
)


def _device(device: DeviceLike) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


class StepTimer:
    """Wall time of training steps, plus the sum over the current logging window.

    On CUDA, kernels run asynchronously: without a synchronize the clock would measure how fast
    Python enqueues work, not how long the GPU takes. `sync=False` skips that (cheaper, but then
    only the window total over many steps is meaningful, not a single step).
    """

    def __init__(self, device: DeviceLike = None, sync: bool = True) -> None:
        dev = _device(device)
        self._cuda_device = dev if (sync and dev.type == "cuda") else None
        self._t0: Optional[float] = None
        self.last_s: Optional[float] = None
        self.window_s = 0.0
        self.window_steps = 0

    def _sync(self) -> None:
        if self._cuda_device is not None:
            torch.cuda.synchronize(self._cuda_device)

    def start(self) -> None:
        self._sync()  # work queued before the step must not be billed to it
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """End the step; returns its duration in seconds and adds it to the window."""
        if self._t0 is None:
            raise RuntimeError("StepTimer.stop() called without start()")
        self._sync()
        self.last_s = time.perf_counter() - self._t0
        self._t0 = None
        self.window_s += self.last_s
        self.window_steps += 1
        return self.last_s

    def pop_window(self) -> tuple[int, float]:
        """(steps, seconds) timed since the last pop; resets the window (call when logging)."""
        window = (self.window_steps, self.window_s)
        self.window_s, self.window_steps = 0.0, 0
        return window

    def __enter__(self) -> "StepTimer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._t0 is not None:
            self.stop()


def throughput(count: float, seconds: float) -> Optional[float]:
    """count / seconds, or None for an empty interval."""
    return count / seconds if seconds > 0 else None


def samples_per_s(samples: float, seconds: float) -> Optional[float]:
    return throughput(samples, seconds)


def tokens_per_s(tokens: float, seconds: float) -> Optional[float]:
    return throughput(tokens, seconds)


def peak_memory_bytes(device: DeviceLike = None) -> Optional[int]:
    """Peak memory since start (or the last reset): CUDA allocator peak, or CPU process peak RSS.

    The CPU figure is the whole process's high-water mark (data, Python, torch), not tensors
    only, and cannot be reset.
    """
    dev = _device(device)
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    if dev.type == "cpu":
        try:
            import resource
        except ImportError:  # Windows
            return None
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports KiB, macOS bytes.
        return int(peak if sys.platform == "darwin" else peak * 1024)
    return None


def reset_peak_memory(device: DeviceLike = None) -> None:
    """Start a new CUDA peak window (no-op on CPU, whose peak RSS cannot be reset)."""
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_flops(device_name: str, dtype: torch.dtype = torch.bfloat16) -> Optional[float]:
    """Dense tensor-core peak FLOP/s for bf16/fp16 on a known GPU; None otherwise.

    fp32 returns None: its peak depends on whether TF32 is enabled (several x apart), so any
    single number would mislead.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    for pattern, flops in PEAK_BF16_FLOPS:
        if pattern.lower() in device_name.lower():
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_second: Optional[float], device: DeviceLike = None,
        dtype: torch.dtype = torch.bfloat16, num_devices: int = 1) -> Optional[float]:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of `num_devices` GPUs.

    `tokens_per_second` is the throughput of those `num_devices` GPUs together (e.g. the global
    rate with num_devices=world_size). None on CPU, unknown GPUs or fp32.
    """
    dev = _device(device)
    if dev.type != "cuda" or tokens_per_second is None or not torch.cuda.is_available():
        return None
    peak = peak_flops(torch.cuda.get_device_name(dev), dtype)
    if peak is None or num_devices < 1:
        return None
    return flops_per_token * tokens_per_second / (peak * num_devices)


def achieved_flops(flops_per_token: Optional[float], tokens_per_second: float, device: DeviceLike,
                   dtype: torch.dtype, num_devices: int) -> dict:
    """A logged row's `tflops_per_device` (achieved model FLOP/s per device, any device) and `mfu`
    (its share of the tabulated peak: known GPUs in bf16 only, None rather than a guess). Both None
    for a model without a FLOP count."""
    if not flops_per_token:
        return {"tflops_per_device": None, "mfu": None}
    return {"tflops_per_device": flops_per_token * tokens_per_second / num_devices / 1e12,
            "mfu": mfu(flops_per_token, tokens_per_second, device, dtype, num_devices=num_devices)}


def transformer_flops_per_token(n_params: int, n_layer: int, width: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder-only transformer (forward + backward).

    6N for the weight matmuls (2 forward, 4 backward) plus 12*L*d*T for attention scores and
    values (PaLM paper, appendix B). Embedding parameters should be excluded from n_params by
    the caller when they are a lookup, not a matmul.
    """
    return 6.0 * n_params + 12.0 * n_layer * width * seq_len

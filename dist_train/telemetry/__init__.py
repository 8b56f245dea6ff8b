"""Telemetry: metrics sinks, progress, energy, performance counters and run provenance.

Depends only on torch, the standard library and optional third-party packages (tensorboard,
tqdm, pynvml, psutil), never on the rest of dist_train, so every other package can use it.
"""

from ._fs import atomic_write_text
from .energy import (
    EnergyMeter,
    NvmlCounterMeter,
    NvmlPowerMeter,
    PowerIntegrator,
    RaplMeter,
    make_energy_meter,
)
from .perf import (
    PEAK_BF16_FLOPS,
    StepTimer,
    achieved_flops,
    mfu,
    peak_flops,
    peak_memory_bytes,
    reset_peak_memory,
    samples_per_s,
    throughput,
    tokens_per_s,
    transformer_flops_per_token,
)
from .progress import Progress
from .provenance import collect_provenance, git_info, write_provenance
from .writers import TAGS, MetricsWriter, tag_for

__all__ = [
    "EnergyMeter",
    "MetricsWriter",
    "NvmlCounterMeter",
    "NvmlPowerMeter",
    "PEAK_BF16_FLOPS",
    "PowerIntegrator",
    "Progress",
    "RaplMeter",
    "StepTimer",
    "TAGS",
    "collect_provenance",
    "git_info",
    "make_energy_meter",
    "mfu",
    "achieved_flops",
    "atomic_write_text",
    "peak_flops",
    "peak_memory_bytes",
    "reset_peak_memory",
    "samples_per_s",
    "tag_for",
    "throughput",
    "tokens_per_s",
    "transformer_flops_per_token",
    "write_provenance",
]

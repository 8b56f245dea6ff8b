"""What ran, where, with which code: a JSON record written next to a run's metrics.

Every probe tolerates absence (no git, no CUDA, no /proc): provenance must never be the reason
a run fails to start. Versions come from package metadata rather than imports, so recording
that DeepSpeed 0.x is installed does not cost DeepSpeed's multi-second import.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional

from ._fs import atomic_write_text

# Distribution names as pip knows them; absent packages are simply left out.
PACKAGES = ("torch", "numpy", "pydantic", "deepspeed", "fairscale", "tensorboard", "dist-train")

# Launcher variables that explain a run's layout. A whitelist, never the whole environment:
# environments carry tokens and passwords.
ENV_VARS = (
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK",
    "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
)

# The package lives at <repo>/dist_train/telemetry/provenance.py in a source checkout.
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _package_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _git(*args: str, cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_info(package_dir: Path = _PACKAGE_DIR) -> Optional[dict[str, Any]]:
    """SHA and dirty flag of the checkout holding dist_train; None when it is not one."""
    # An installed copy in site-packages may sit inside some unrelated repository (a venv inside
    # a project); that repository's SHA would describe the wrong code.
    if any(part in ("site-packages", "dist-packages") for part in package_dir.parts):
        return None
    root = _git("rev-parse", "--show-toplevel", cwd=package_dir)
    sha = _git("rev-parse", "HEAD", cwd=package_dir) if root else None
    if not root or not sha:
        return None
    # Untracked files count as dirty: a new, uncommitted module changes what ran just as much.
    # (.gitignore'd outputs such as runs/ are not listed by git status.)
    status = _git("status", "--porcelain", cwd=package_dir)
    return {"sha": sha, "dirty": None if status is None else bool(status), "root": root}


def cpu_model() -> Optional[str]:
    """The CPU's marketing name (None where the system does not say)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "Model")):  # x86 / some ARM kernels
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def total_ram_bytes() -> Optional[int]:
    """Physical memory of the machine in bytes (None where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX (Windows)
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:
        return None


def usable_cpus() -> Optional[int]:
    """Cores this process may run on."""
    # Affinity (taskset, SLURM cgroups) is what this process can actually use, not os.cpu_count().
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _cuda_info() -> dict[str, Any]:
    """torch's view of the GPUs. torch is already imported by the trainer, so this costs nothing."""
    info: dict[str, Any] = {"available": False, "device_count": 0, "devices": []}
    try:
        import torch
    except ImportError:
        return info
    info["cuda_runtime"] = torch.version.cuda
    info["hip_runtime"] = getattr(torch.version, "hip", None)
    try:
        if not torch.cuda.is_available():
            return info
        count = torch.cuda.device_count()
        info.update(available=True, device_count=count,
                    devices=[torch.cuda.get_device_name(i) for i in range(count)])
        info["cudnn"] = torch.backends.cudnn.version()
    except Exception as e:  # a broken driver should be visible in the record, not fatal
        info["error"] = str(e)
        return info
    info["driver"] = _nvidia_driver_version()
    return info


def _nvidia_driver_version() -> Optional[str]:
    # torch only exposes the CUDA API version; the driver release (e.g. "550.54.15") comes from NVML.
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def collect_provenance(command: list[str], extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Collect the provenance record. `extra` (e.g. the resolved config) is stored under "extra"."""
    return {
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": list(command),
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "packages": _package_versions(),
        "git": git_info(),
        "host": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpu_usable": usable_cpus(),
            "ram_bytes": total_ram_bytes(),
        },
        "cuda": _cuda_info(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "extra": dict(extra) if extra else {},
    }


def write_provenance(path: Path | str, data: Mapping[str, Any]) -> None:
    """Write `data` as indented JSON, atomically (tmp file + os.replace)."""
    # default=str: a stray Path or enum in `extra` should be recorded as text, not crash the run.
    atomic_write_text(Path(path), json.dumps(data, indent=2, default=str) + "\n")

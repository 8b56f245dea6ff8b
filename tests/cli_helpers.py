"""What the CLI tests share: how to call `dist-train`, a clean environment, and a tiny config file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from dist_train.runtime.env import free_port  # noqa: F401  (re-exported for the CLI tests)

_SCRIPT = Path(sys.executable).with_name("dist-train")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dist_train"]
# The real torchrun (what the `torchrun` script runs), one node, its own c10d rendezvous.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

# A whole config file (schema defaults underneath, not the quickstart): end-to-end backprop.
TINY_YAML = """\
run: {name: tiny}
model: {n_layer: 2, width: 32, n_head: 2, block_size: 16}
data: {max_bytes: 200000}
train: {batch_size: 8, steps: 4, log_every: 1, eval_batches: 1}
runtime: {threads: 1}
telemetry: {progress: "off"}
"""

# Launcher variables that must not leak from an outer torchrun/Slurm/MPI into the runs under test.
_WORLD_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "DIST_TRAIN_ERROR_DIR")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment minus any launcher variables a surrounding job may have set, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in _WORLD_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI_", "TORCHELASTIC_"))}
    env.update(extra)
    return env


def cli(args: list[str], cwd: Path, env: Optional[dict[str, str]] = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one non-empty stderr line `dist-train: error: ...` containing every needle."""
    report = f"exit {proc.returncode}\n--- stderr:\n{proc.stderr}\n--- stdout:\n{proc.stdout}"
    assert "Traceback" not in proc.stderr, report
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, report
    line = lines[0]
    assert line.startswith("dist-train: error: "), report
    for needle in needles:
        assert needle in line, report
    assert proc.returncode == 2, report
    return line


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def config_file(tmp_path_factory, text: str, name: str = "config.yaml") -> Path:
    """`text` written as a config file in a fresh temporary folder (for a module's `config` fixture)."""
    path = tmp_path_factory.mktemp("cfg") / name
    path.write_text(text)
    return path

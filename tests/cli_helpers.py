"""What the CLI tests share: how to call `dist-train`, a clean environment, and a tiny config file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_SCRIPT = Path(sys.executable).with_name("dist-train")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dist_train"]

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

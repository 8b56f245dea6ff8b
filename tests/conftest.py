"""Shared fixtures for the multi-process tests: run the real CLI (`dist-train run` / `launch`) on a
tiny config and read back what it logged.

Every run goes under a pytest temporary directory (`run.dir`), never into the repository.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from cli_helpers import TINY_YAML, clean_env, forked_run  # tests/ is on sys.path

# A model and data set small enough that a 2-rank run takes seconds on 2 CPU cores.
TINY_GPT = ["model.n_layer=2", "model.width=32", "model.n_head=2", "model.block_size=16",
            "data.max_bytes=200000", "train.batch_size=8", "train.log_every=1", "optim.warmup_steps=2",
            "train.eval_batches=1", "telemetry.tensorboard=false",
            "train.sample_tokens=0",  # the quickstart generates 200 tokens after training: seconds per run
            "parallel.stages=1"]  # end-to-end backprop (the quickstart itself is a 2-stage pipeline)

class DistTrain:
    """Runs the CLI; returns the parsed metrics.jsonl of the run.

    `run` and `forked` start their ranks from a fork server that imported torch once (see
    `cli_helpers.forked_run`); `launch` goes through `dist-train launch` and torch's elastic agent,
    for tests of what the agent adds (restarts, its store, the launcher's own checks and messages).
    """

    timeout_s = 300
    TINY_GPT = TINY_GPT

    def _call(self, argv: list[str], cwd: Path, steps: int, env: Optional[dict[str, str]] = None) -> str:
        env = clean_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        cwd.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "dist_train", *argv], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=self.timeout_s)
        out = proc.stdout
        # Strict: a worker that aborts at exit after a complete run is a failure too (the library
        # leaves workers with os._exit for exactly that reason; see dist_train/__main__.py).
        if proc.returncode != 0:
            pytest.fail(f"dist-train {' '.join(argv)} exited {proc.returncode}:\n{out[-6000:]}", pytrace=False)
        return out

    def run(self, run_dir: Path, name: str, *overrides: str, steps: int) -> list[dict]:
        """One process, backend none."""
        args = ["quickstart.yaml", f"run.dir={run_dir}", f"run.name={name}", f"train.steps={steps}",
                "parallel.backend=none", "parallel.stages=1", "runtime.threads=1", *overrides]
        forked_run(args, run_dir, nproc=1, timeout=self.timeout_s)
        return self.metrics(run_dir / name)

    def forked(self, run_dir: Path, name: str, *overrides: str, steps: int, nproc: int = 2,
               env: Optional[dict[str, str]] = None) -> list[dict]:
        """The ranks `launch` starts (`nproc` gloo workers, one thread each), without the agent."""
        args = ["quickstart.yaml", f"run.dir={run_dir}", f"run.name={name}", f"train.steps={steps}",
                "parallel.stages=1", *overrides]
        forked_run(args, run_dir, nproc=nproc, env=env, timeout=self.timeout_s)
        return self.metrics(run_dir / name)

    def launch(self, run_dir: Path, name: str, *overrides: str, steps: int, nproc: int = 2,
               env: Optional[dict[str, str]] = None) -> list[dict]:
        """`nproc` gloo workers through the elastic agent, one thread each; `env` adds variables."""
        args = ["quickstart.yaml", "--nproc", str(nproc), "--threads", "1", f"run.dir={run_dir}",
                f"run.name={name}", f"train.steps={steps}", "parallel.stages=1", *overrides]
        self._call(["launch", *args], run_dir, steps, env)
        return self.metrics(run_dir / name)

    @staticmethod
    def metrics(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def dt() -> DistTrain:
    return DistTrain()


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole tiny config file (end-to-end backprop), for tests that pass a config path."""
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path

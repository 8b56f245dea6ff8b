"""What the CLI tests share: how to call `dist-train`, a clean environment, and a tiny config file."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
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


# What the fork server behind `forked_run` imports once, so that each rank it forks starts with torch
# and the training loops loaded (a module missing here is imported by the rank itself, as usual).
FORK_PRELOAD = ("torch", "torch.distributed", "torch.nn.parallel", "torch.distributed.fsdp", "dist_train.cli",
                "dist_train.runtime", "dist_train.train.loop", "dist_train.train.local_loop", "cli_helpers")


def _python_path_first() -> None:
    """What a fresh interpreter started with this environment's PYTHONPATH would import: its folders
    (those not on the fork server's path already) go first on sys.path, and a module the server
    imported that one of them provides is forgotten (torch imports pynvml when it is imported), so
    the rank imports it from there: a test's stand-in module, say."""
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    if not entries:
        return
    import importlib

    sys.path[:0] = entries
    tops = {name.split(".")[0] for name in sys.modules}
    provided = {top for top in tops for entry in entries
                if Path(entry, top + ".py").exists() or Path(entry, top).is_dir()}
    for name in [name for name in sys.modules if name.split(".")[0] in provided]:
        del sys.modules[name]
    importlib.invalidate_caches()


def _cli_rank(rank: int, world: int, argv: list[str], cwd: str, log: str) -> None:
    # A forked rank writes to the fork server's descriptors (whatever they were when the server
    # started, another test's capture perhaps): give each rank a file of its own instead.
    fd = os.open(f"{log}{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(cwd)
    if world == 1:  # one process with no launcher around it, as a plain `dist-train run`
        for k in _WORLD_VARS:
            os.environ.pop(k, None)
    _python_path_first()
    from dist_train.cli import main

    code = main(argv)
    if code != 0:
        raise RuntimeError(f"rank {rank}: dist-train {' '.join(argv)} returned {code}")


def forked_ranks(fn, nprocs: int = 2, args: tuple = (), timeout: float = 300):
    """`run_on_ranks(fn, nprocs, args)` with its ranks forked from the fork server of `forked_run`,
    in this environment minus any launcher variables; returns rank 0's answer."""
    from dist_train.bench._spawn import run_on_ranks

    return run_on_ranks(fn, nprocs=nprocs, args=args, threads=1, preload=FORK_PRELOAD, env=clean_env(),
                        timeout_s=timeout)


def forked_run(args: list[str], cwd: Path, nproc: int = 1, env: Optional[dict[str, str]] = None,
               timeout: float = 300) -> str:
    """`dist-train run ARGS` on `nproc` local gloo ranks, one thread each, forked from a fork server
    that imported torch once; returns rank 0's output. The same ranks `dist-train launch --nproc
    NPROC --threads 1` starts, minus the elastic agent and an interpreter start with torch's import
    per rank (seconds each on a loaded machine): for tests of what the ranks compute, not of the
    launcher. A rank that fails or exits non-zero fails the test with every rank's output. `env`
    is added to this environment; a PYTHONPATH in it is honoured as a fresh interpreter would
    (`_python_path_first`)."""
    from dist_train.bench._spawn import run_on_ranks

    cwd.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="dist-train-forked-"))
    launcher = ["launch", args[0], "--nproc", str(nproc), "--threads", "1", *args[1:]] if nproc > 1 else ["run", *args]
    env = clean_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                    DIST_TRAIN_COMMAND=shlex.join(["dist-train", *launcher]), **(env or {}))
    try:
        try:
            run_on_ranks(_cli_rank, nprocs=nproc, args=(["run", *args], str(cwd), str(logs / "rank")), threads=1,
                         preload=FORK_PRELOAD, env=env, timeout_s=timeout)
        except Exception as e:
            import pytest

            outputs = "\n".join(f"--- rank {r}:\n{_tail(logs / f'rank{r}')}" for r in range(nproc))
            pytest.fail(f"dist-train run {' '.join(args)} on {nproc} forked ranks failed: {e}\n{outputs}", pytrace=False)
        return (logs / "rank0").read_text()
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def _cli_process(rank: int, world: int, argv: list[str], cwd: str, log: str, merge: bool) -> int:
    out = os.open(f"{log}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(f"{log}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if not merge else out
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    if err != out:
        os.close(err)
    os.chdir(cwd)
    for k in _WORLD_VARS:  # no launcher around it, as a `dist-train` typed in a shell
        os.environ.pop(k, None)
    from dist_train.cli import main

    try:
        return main(argv)
    except SystemExit as e:  # argparse's own exits
        return e.code if isinstance(e.code, int) else 1
    except BaseException:  # what the interpreter would print before exiting 1
        import traceback

        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def forked_cli(args: list[str], cwd: Path, env: Optional[dict[str, str]] = None, timeout: float = 120,
               merge_stderr: bool = False) -> subprocess.CompletedProcess:
    """`dist-train ARGS` (plan, run, export: not launch) as one process forked from the fork server
    of `forked_run`, so without an interpreter start and torch's import: its exit status, stdout and
    stderr (in stdout with `merge_stderr`), as `cli` returns them. For what the command prints and
    returns; the process-level contract (nothing more on stderr at start-up and exit) is
    test_cli_errors.py's, with `cli`."""
    from dist_train.bench._spawn import run_on_ranks

    logs = Path(tempfile.mkdtemp(prefix="dist-train-forked-"))
    try:
        code = run_on_ranks(_cli_process, nprocs=1, args=(list(args), str(cwd), str(logs / "cli"), merge_stderr),
                            threads=1, preload=FORK_PRELOAD, env=env or clean_env(), timeout_s=timeout)
        err = "" if merge_stderr else (logs / "cli.err").read_text()
        return subprocess.CompletedProcess(["dist-train", *args], code, (logs / "cli.out").read_text(), err)
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no output)"

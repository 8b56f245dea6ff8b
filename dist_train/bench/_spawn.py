"""Run a function on N local gloo ranks (one CPU thread each) and return rank 0's answer.

Benchmarks need a real process group but not the launcher: they start their own workers with
`torch.multiprocessing.spawn`, give them the `env://` variables of a free local port (what torchrun
would export), and pin each to `threads` intra-op threads so ranks do not fight over the cores.
The worker function creates the process group itself (through `init_distributed`), so the code
under test sets it up exactly as in a real run.

With `preload`, workers are forked from a fork server that has imported those modules once (torch
among them) instead of each starting a fresh interpreter: a benchmark that starts dozens of short
runs then pays torch's import (several seconds on a loaded 2-core machine) once, not per run. The
server is single-threaded and has created no process group, so every worker still starts clean.
Its workers inherit the server's environment (as it was when the server started), not the caller's
current one: pass `env` where the workers must see a particular environment.
"""

from __future__ import annotations

import contextlib

import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from dist_train.runtime.env import free_port

# Read by OpenMP/MKL when the child imports torch, so they must be in the environment before spawn.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _entry(rank: int, fn: Callable[..., Any], nprocs: int, port: int, threads: int, out: str,
           args: tuple, env: Optional[Mapping[str, str]] = None) -> None:
    import torch

    if env is not None:
        os.environ.clear()
        os.environ.update(env)
        os.environ.update({k: str(threads) for k in _THREAD_VARS})
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    result = fn(rank, nprocs, *args)
    if rank == 0:
        Path(out).write_bytes(pickle.dumps(result))
    from dist_train.runtime.dist import exit_worker

    exit_worker(0)


def run_on_ranks(fn: Callable[..., Any], nprocs: int = 2, args: tuple = (), threads: int = 1,
                 preload: Sequence[str] = (), env: Optional[Mapping[str, str]] = None,
                 timeout_s: Optional[float] = None) -> Any:
    """Call `fn(rank, world_size, *args)` in `nprocs` fresh processes; return rank 0's return value.

    `fn` must be a module-level function (it is pickled into spawned interpreters). A worker that
    raises makes this raise `torch.multiprocessing.ProcessRaisedException` with its traceback.
    `preload`: start the workers from a fork server that imported these modules (see above); the
    list only counts on the first such call of a process, which starts the server.
    `env`: the workers' whole environment (the rank and thread variables are added); default: inherited.
    `timeout_s`: kill the workers and raise TimeoutError if they have not all finished by then.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update({k: str(threads) for k in _THREAD_VARS})
    fd, out = tempfile.mkstemp(prefix="dist-train-bench-", suffix=".pkl")
    os.close(fd)
    try:
        if preload:
            multiprocessing.set_forkserver_preload(list(preload))
        ctx = mp.start_processes(_entry, args=(fn, nprocs, free_port(), threads, out, args, env), nprocs=nprocs,
                                 join=False, start_method="forkserver" if preload else "spawn")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not ctx.join(None if deadline is None else max(0.0, deadline - time.monotonic())):
            if deadline is not None and time.monotonic() >= deadline:
                for p in ctx.processes:
                    p.kill()
                    p.join()
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {nprocs} ranks ran past {timeout_s:g} s")
        return pickle.loads(Path(out).read_bytes())
    finally:
        Path(out).unlink(missing_ok=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def one_thread_env():
    """OMP/MKL threads set to 1 while pool workers start (they inherit the environment)."""
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

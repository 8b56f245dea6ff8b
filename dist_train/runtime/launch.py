"""`dist-train launch`: local workers started by torch's elastic agent (what torchrun runs inside).

The config is validated here first, so bad input fails once, in the parent, with exit 2 — not N
times in N workers. Workers that still reject their input (a corrupt checkpoint, say) leave a
one-line message in a shared folder; the launcher prints it once.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import socket
import sys
import tempfile
import uuid
from pathlib import Path

from dist_train.config import load_config
from dist_train.config.layout import check_layout
from dist_train.errors import ERROR_DIR_ENV, SILENT_PEERS, UserError
from dist_train.runtime.env import LOOPBACK, free_port, port_is_free


def _wait_for_master(addr: str, port: int, timeout_s: float) -> None:
    """Reach node 0's rendezvous port within the start-up timeout (node 0 may start later), or fail
    with one line: an address that does not resolve or answer would otherwise hang until the
    rendezvous gives up, with a page of elastic-agent traceback."""
    import time

    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--master-addr {addr} does not resolve ({e.strerror})") from None
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            last = e.strerror or type(e).__name__
        if time.monotonic() >= deadline:
            raise UserError(f"--master-addr {addr}:{port} cannot be reached within {timeout_s:g}s ({last}): is node 0 "
                            f"started (dist-train launch ... --node-rank 0) and is the address routable from here?")
        time.sleep(1.0)


def _messages(err_dir: Path) -> dict[int, str]:
    """Each worker's one line (written with its prefix: "dist-train: error: ..." or "dist-train: ...")."""
    return {int(f.stem[4:]): f.read_text().strip() for f in err_dir.glob("rank*.txt")}


def _root_cause(error, err_dir: Path) -> str:
    """One line for a failed worker group. Rejected input (exit 2) first; then a timeout that names
    the stuck ranks; then a worker that died without a word (a signal, a crash), since the
    survivors' messages only say they lost it."""
    messages = _messages(err_dir)
    failures = sorted(error.failures.items())
    for rank, failure in failures:
        if failure.exitcode == 2 and rank in messages:
            return messages[rank]
    for rank, message in sorted(messages.items()):
        if SILENT_PEERS in message:  # a timeout that names the hung ranks (the agent then killed them)
            return message
    for rank, failure in failures:
        if rank not in messages:
            return f"dist-train: error: worker rank {rank} exited with status {failure.exitcode} (see its output above)"
    return messages[failures[0][0]]


_TORCH_CLOSE = None  # torch's own PContext.close, kept so that patching twice wraps it once


def _stop_within_grace(grace_s: int) -> None:
    """Give a failed worker group `runtime.stop_grace_s` between SIGTERM and SIGKILL, not torch's 30 s.

    When a worker fails, torch's agent stops the survivors with a hard-coded 30 s grace, twice over:
    the process context's poll calls `close()` with its default timeout, and
    `LocalElasticAgent._stop_workers` calls `_shutdown()` with its own (pytorch/pytorch#119856;
    pytorch/pytorch#192815 proposes the second half). Only the launcher's SIGTERM path passes
    `LaunchConfig.shutdown_timeout`. A peer hung in a collective ignores SIGTERM, so a failed job
    outlived its grace by 30 s. Both defaults take the configured grace here, in the launcher process
    only; explicit timeouts are left as they are.
    """
    global _TORCH_CLOSE
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing.api import PContext

    if _TORCH_CLOSE is None:
        _TORCH_CLOSE = PContext.close
    torch_close = _TORCH_CLOSE

    def close(self, death_sig=None, timeout=None) -> None:
        torch_close(self, death_sig, grace_s if timeout is None else timeout)

    def stop_workers(self, worker_group) -> None:
        self._shutdown(timeout=grace_s)

    PContext.close = close
    LocalElasticAgent._stop_workers = stop_workers


def _check_memory(cfg, world: int, local_ranks: int) -> None:
    """The memory refusal, once here rather than in N workers, where this process can read the figure
    without touching a GPU: on CPU (the node's RAM over its ranks). On GPUs each worker checks its own."""
    import torch

    from dist_train.train.memory_check import check_memory

    if cfg.runtime.device == "cpu" or not torch.cuda.is_available():
        check_memory(cfg, world, local_ranks)


def launch(args: argparse.Namespace) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if args.nproc < 1 or args.nnodes < 1:
        raise UserError("--nproc and --nnodes must be at least 1")
    if not (0 <= args.node_rank < args.nnodes):
        raise UserError(f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1}")
    cfg = load_config(args.config, args.overrides)
    check_layout(cfg, args.nproc * args.nnodes)
    _check_memory(cfg, args.nproc * args.nnodes, args.nproc)

    if args.nnodes > 1:
        if not args.master_addr:
            raise UserError("--master-addr is required with --nnodes > 1 (the routable address of node 0)")
        if args.master_addr.startswith(LOOPBACK):
            raise UserError(f"--master-addr {args.master_addr} is a loopback address but the job spans "
                            f"{args.nnodes} nodes; use node 0's routable address")
        port = args.master_port or 29500  # every node must know it without talking: torchrun's default
        if args.node_rank > 0:  # node 0 hosts the store: the others must reach it, or say why not
            _wait_for_master(args.master_addr, port, cfg.runtime.start_timeout_s)
        endpoint = f"{args.master_addr}:{port}"
        # Every node must name the same run: derive it from the rendezvous endpoint, not a random id.
        run_id = f"dist-train-{args.master_addr}-{port}"
    else:
        port = args.master_port or free_port("")  # "": the store listens on every interface
        endpoint = f"127.0.0.1:{port}"
        run_id = f"dist-train-{uuid.uuid4().hex[:8]}"
    # Node 0's agent hosts the store there: a port already held would fail the rendezvous with a page
    # of traceback. Checked where the user chose it (or the 29500 default applies).
    if args.node_rank == 0 and (args.master_port or args.nnodes > 1) and not port_is_free(port):
        raise UserError(f"rendezvous port {port} (--master-port) is already in use on this host; "
                        f"choose a free one with --master-port")
    # Static rendezvous on one node too: every node knows its rank and node 0's agent hosts the one
    # store, which the workers share (a restart gets a fresh key prefix). Under the dynamic c10d
    # rendezvous with sharing off, the agent would instead name a port for worker 0 to bind seconds
    # later, after spawn and import, and another process can take it in between (EADDRINUSE in CI).
    rdzv = dict(rdzv_backend="static", rdzv_endpoint=endpoint,
                rdzv_configs={"rank": args.node_rank, "timeout": int(cfg.runtime.start_timeout_s)})

    # One rank stands for one device: split the cores so workers do not oversubscribe the CPU.
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    # Workers record the command the user typed, not their own `python -m dist_train run ...`.
    os.environ.setdefault("DIST_TRAIN_COMMAND", shlex.join(["dist-train", *sys.argv[1:]]))
    err_dir = tempfile.mkdtemp(prefix="dist-train-err-")
    os.environ[ERROR_DIR_ENV] = err_dir
    # The agent reports a failed worker with a page of log lines; our one line says it better.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)

    config = LaunchConfig(min_nodes=args.nnodes, max_nodes=args.nnodes, nproc_per_node=args.nproc,
                          run_id=run_id, max_restarts=args.max_restarts,
                          monitor_interval=0.5, start_method="spawn", **rdzv)
    config.shutdown_timeout = cfg.runtime.stop_grace_s  # read by the agent where torch has the field
    _stop_within_grace(cfg.runtime.stop_grace_s)
    worker_args = ["-m", "dist_train", "run", str(args.config), *args.overrides]
    try:
        elastic_launch(config, sys.executable)(*worker_args)
        return 0
    except ChildFailedError as e:
        print(_root_cause(e, Path(err_dir)), file=sys.stderr)
        codes = {f.exitcode for f in e.failures.values()}
        return 2 if 2 in codes else 1
    except SignalException as e:  # SIGTERM/SIGINT to the launcher: the agent passed it on to the workers
        stopped = _messages(Path(err_dir))
        print(stopped[min(stopped)] if stopped else f"dist-train: stopped by {signal.Signals(e.sigval).name} "
              f"before a checkpoint could be committed", file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        for f in Path(err_dir).glob("*"):
            f.unlink()
        os.rmdir(err_dir)

"""Process group, device and device mesh set-up, with per-phase collective timeouts.

One process group is created with the generous start-up timeout. The trainer then moves between
phases ("start", "steady", "save"); entering a phase re-arms the group's timeout, so a rank that
hangs in steady state fails within `runtime.steady_timeout_s` with an error that names the rank and
the phase, instead of freezing the job for the start-up timeout.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from dist_train.config.layout import check_layout
from dist_train.config.schema import Config
from dist_train.errors import SILENT_PEERS, DistTimeoutError, UserError
from dist_train.runtime.env import WorldInfo, discover, export_env
from dist_train.runtime.malloc import configure_cpu_malloc
from dist_train.runtime.mesh import build_mesh, dp_mesh, shard_mesh

_TIMEOUT_WORDS = ("timed out", "timeout", "deadline")
_PEER_LOST_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe")


@dataclass
class DistContext:
    world: WorldInfo
    device: torch.device
    backend: Optional[str]  # torch.distributed backend string, None when no process group
    mesh: Optional[object] = None  # the run's DeviceMesh over ("stage", "dp"): runtime/mesh.py
    # A gloo group of all ranks for the run's own small votes (stop requests): on CPU even in an
    # NCCL run, and apart from the default group so it never orders against stage-to-stage traffic.
    control_group: Optional[object] = None
    timeouts: dict[str, float] = field(default_factory=dict)
    current_phase: str = "start"

    @property
    def dp_mesh(self) -> Optional[object]:
        """This rank's data-parallel row of the mesh (every rank when there is one stage)."""
        if self.mesh is None:
            return None
        if "_dp" not in self.__dict__:  # sliced once, so every backend shares the same object
            self.__dict__["_dp"] = dp_mesh(self.mesh)
        return self.__dict__["_dp"]

    @property
    def shard_mesh(self) -> Optional[object]:
        """The mesh FSDP2 shards over: `dp_mesh`, or under HSDP its 2-D ("dp_replicate", "dp_shard")
        view, built with the context (`init_distributed`), since building it is collective."""
        return self.__dict__.get("_shard", self.dp_mesh)

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def world_size(self) -> int:
        return self.world.world_size

    @property
    def is_main(self) -> bool:
        return self.world.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _set_timeout(self, seconds: float) -> None:
        if not self.distributed:
            return
        # Private but stable since torch 2.2: re-arms the timeout of an existing group (gloo and
        # nccl), which is exactly a per-phase timeout without building a second group.
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(timedelta(seconds=seconds))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run a block under phase `name`'s timeout; a collective timeout becomes DistTimeoutError."""
        previous = self.current_phase
        self.current_phase = name
        self._set_timeout(self.timeouts.get(name, self.timeouts.get("start", 600.0)))
        try:
            yield
        except RuntimeError as e:  # DistBackendError and gloo's errors are RuntimeErrors
            text = str(e).lower()
            if isinstance(e, DistTimeoutError):
                raise
            if any(w in text for w in _TIMEOUT_WORDS):
                silent = self._silent_peers(name)
                who = (f"rank {', '.join(map(str, silent))} {SILENT_PEERS} (stuck or dead)" if silent
                       else "another rank is probably stuck or dead")
                raise DistTimeoutError(
                    f"rank {self.rank}: a collective timed out after {self.timeouts.get(name)}s in phase "
                    f"'{name}'; {who}") from e
            if any(w in text for w in _PEER_LOST_WORDS):
                raise DistTimeoutError(f"rank {self.rank}: lost the connection to another rank in phase "
                                       f"'{name}' (it probably died; see its output)") from e
            raise
        finally:
            self.current_phase = previous
            self._set_timeout(self.timeouts.get(previous, 600.0))

    def _silent_peers(self, phase: str, wait_s: float = 5.0) -> Optional[list[int]]:
        """After a timeout: the ranks that do not check in within `wait_s` (None: unknown).

        A collective's error does not say which peer held it up. Every rank that times out writes
        its rank into the rendezvous store (hosted by the launcher's agent, or rank 0 without one)
        and waits a moment for the others; the ranks that never write are the stuck or dead ones.
        """
        try:
            store = dist.distributed_c10d._get_default_store()
            store.set_timeout(timedelta(seconds=wait_s))
            prefix = f"dist_train/alive/{phase}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
            store.set(f"{prefix}/{self.rank}", "1")
            deadline = time.monotonic() + wait_s
            while True:
                silent = [r for r in range(self.world_size) if not store.check([f"{prefix}/{r}"])]
                if not silent or time.monotonic() > deadline:
                    return silent
                time.sleep(0.2)
        except Exception:  # the store itself is gone (its host died): say nothing rather than guess
            return None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_mean(self, value: float, group=None) -> float:
        """Mean of a Python float over ranks, or over `group` (for logging; not on the hot path)."""
        size = self.world_size if group is None or not self.distributed else dist.get_world_size(group)
        if not self.distributed or size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, group=group)
        return float(t.item()) / size

    def all_reduce_sum(self, values: list[float], group=None) -> list[float]:
        """Sums of Python floats over ranks, or over `group`."""
        size = self.world_size if group is None or not self.distributed else dist.get_world_size(group)
        if not self.distributed or size == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, group=group)
        return t.tolist()

    def all_reduce_max(self, value: float) -> float:
        if not self.distributed or self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.backend and "nccl" in self.backend else torch.device("cpu")

    def destroy(self) -> None:
        if not self.distributed:
            return
        try:
            # Leave together: a rank that tears its connections down while a peer is still talking
            # makes gloo threads die mid-operation.
            with self.phase("save"):
                dist.barrier()
        except Exception:
            pass  # a peer already died; its error is the one that matters
        dist.destroy_process_group()


def pick_device(cfg: Config, local_rank: int) -> torch.device:
    want = cfg.runtime.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("runtime.device: cuda requested but no CUDA device is available")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _pin_socket_interface(master_addr: str) -> None:
    """Point gloo (and NCCL's bootstrap) at the interface that routes to the master.

    Left alone, gloo binds to whatever the hostname resolves to — 127.0.1.1 on Debian — and the
    job hangs at the first collective. Asking the kernel which local address reaches the master
    (a UDP connect sends nothing) and naming that interface fixes it; a user's setting wins.
    """
    import socket

    import psutil

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_addr, 9))
            local = s.getsockname()[0]
    except OSError:
        return
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == local for a in addrs):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
            return


def _agent_store(world: WorldInfo, timeout: timedelta) -> Optional[dist.Store]:
    """Under the elastic agent, a client of the store its node-0 agent hosts, keyed by restart.

    torch's `env://` handler connects to the agent's store without a prefix, on the assumption that
    every restart gets a fresh store; the static rendezvous keeps one store for the agent's life.
    A restarted group would then read the dead group's gloo addresses and fail to connect. A prefix
    per restart count keeps each attempt's keys apart. None outside the agent: `env://` then
    hosts the store on rank 0 as usual.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(world.master_addr, world.master_port, world.world_size, is_master=False,
                           timeout=timeout)
    return dist.PrefixStore(f"dist-train/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


def init_distributed(cfg: Config, world: Optional[WorldInfo] = None) -> DistContext:
    """Discover the world, pick the device, create the process group and the (stage x dp) mesh."""
    world = world or discover()
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    configure_cpu_malloc(cfg.runtime.cpu_malloc)  # before the model and data allocate
    device = pick_device(cfg, world.local_rank)
    timeouts = {"start": cfg.runtime.start_timeout_s, "steady": cfg.runtime.steady_timeout_s,
                "save": cfg.runtime.save_timeout_s}
    if cfg.parallel.backend == "none" and cfg.parallel.stages == 1:
        if world.world_size > 1:
            raise UserError(f"parallel.backend: none runs one process, but the launcher started {world.world_size}")
        return DistContext(world=world, device=device, backend=None, timeouts=timeouts)

    export_env(world)
    if world.num_nodes > 1:
        _pin_socket_interface(world.master_addr)
    # nccl for CUDA tensors; gloo beside it for the CPU-side collectives (object broadcast, checkpoint
    # planning) that every run also makes.
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        store = _agent_store(world, timedelta(seconds=cfg.runtime.start_timeout_s))
        if store is None:
            kwargs["init_method"] = "env://"
        else:
            kwargs["store"] = store
        dist.init_process_group(backend=backend, rank=world.rank, world_size=world.world_size,
                                timeout=timedelta(seconds=cfg.runtime.start_timeout_s), **kwargs)
    check_layout(cfg, world.world_size)  # the mesh below needs a world the stages divide
    mesh = build_mesh(device.type, world.world_size, cfg.parallel.stages)
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.runtime.steady_timeout_s))
    ctx = DistContext(world=world, device=device, backend=backend, mesh=mesh, timeouts=timeouts,
                      control_group=control)
    if cfg.parallel.dp_replicate > 1:
        ctx.__dict__["_shard"] = shard_mesh(mesh, cfg.parallel.dp_replicate)
    ctx._set_timeout(timeouts["start"])
    return ctx




def exit_worker(code: int) -> None:
    """End a distributed worker whose process group is destroyed, skipping interpreter finalization.

    Gloo's C++ threads can still own tensors then, and freeing them while Python is torn down
    aborts the process ("terminate called without an active exception", pytorch#179291) *after*
    a clean run. Everything is flushed first; nothing is left for atexit handlers to do.
    """
    import sys

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

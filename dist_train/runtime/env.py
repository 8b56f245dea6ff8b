"""Who am I? Rank discovery from torchrun, Slurm (srun), MPI, or a single process.

Each launcher describes the world in its own variables; this module turns them into one `WorldInfo`
and exports the torch.distributed `env://` variables so `init_process_group` works unchanged.
"""

from __future__ import annotations

import os
import random
import re
import socket
import warnings

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, MutableMapping, Optional

from dist_train.errors import UserError

LOOPBACK = ("127.", "localhost", "::1", "0.0.0.0")


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: `node[01-03,07],gpu-a[1-2]` -> node01 node02 node03 node07 gpu-a1 gpu-a2.

    Written by hand because the only other source is `scontrol show hostnames`, which is missing
    inside containers and on login nodes.
    """
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item.strip())
        if not m:
            if item.strip():
                hosts.append(item.strip())
            continue
        prefix, ranges, rest = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                # The suffix may hold another bracket group (`a[1-2]b[3-4]`): expand it recursively.
                hosts.extend(expand_nodelist(f"{prefix}{str(i).zfill(len(lo))}{rest}"))
    return hosts


def _int(env: Mapping[str, str], *keys: str, default: Optional[int] = None) -> Optional[int]:
    for k in keys:
        if env.get(k, "") != "":
            try:
                return int(env[k])
            except ValueError:
                raise UserError(f"environment variable {k}: expected an integer, got {env[k]!r}") from None
    return default


def _slurm_tasks_per_node(env: Mapping[str, str], world: int, nodes: int) -> int:
    # SLURM_TASKS_PER_NODE looks like "4(x2),3"; the first count is this layout's local size.
    m = re.match(r"^(\d+)", env.get("SLURM_TASKS_PER_NODE", ""))
    return int(m.group(1)) if m else max(1, world // max(1, nodes))


# Below both free_port's range and the kernel's ephemeral range (see free_port for why).
_SLURM_PORTS = range(10000, 16384)


def _slurm_port(job_id: Optional[int]) -> int:
    # Derive the port from the job id so every task agrees without talking, and two jobs sharing a
    # node do not collide.
    return _SLURM_PORTS[(job_id or 0) % len(_SLURM_PORTS)]


def _mpi_rendezvous(rank: int, world: int) -> tuple[str, int]:
    """Rank 0 picks a routable address and a free port and broadcasts them over MPI (rendezvous only).

    torch's own `mpi` backend needs a source build, so MPI is used for rendezvous and gloo/nccl
    carry the training traffic.
    """
    from mpi4py import MPI  # imported lazily: only MPI launches need it

    comm = MPI.COMM_WORLD
    payload = None
    if rank == 0:
        addr = routable_address()
        payload = (addr, free_port(""))
    addr, port = comm.bcast(payload, root=0)
    return addr, port


def routable_address() -> str:
    """An address other hosts can reach. `gethostbyname(gethostname())` is 127.0.1.1 on Debian, so
    ask the kernel which source address it would use for a non-local destination instead (no packet
    is sent by connecting a UDP socket)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


def discover(env: Optional[Mapping[str, str]] = None, use_mpi4py: bool = True) -> WorldInfo:
    """Read the launcher's variables. Order: torchrun (explicit env://), Slurm under srun, MPI, single."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", default=world)
        nodes = max(1, world // max(1, local_world))
        info = WorldInfo(
            rank=_int(env, "RANK"), world_size=world, local_rank=_int(env, "LOCAL_RANK", default=0),
            local_world_size=local_world, node_rank=_int(env, "GROUP_RANK", "NODE_RANK", default=0),
            num_nodes=nodes, master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", default=29500), launcher="torchrun")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        hosts = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        if not hosts:
            raise UserError("SLURM_JOB_NODELIST is empty: cannot find the head node")
        world = _int(env, "SLURM_NTASKS")
        nodes = _int(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=len(hosts))
        info = WorldInfo(
            rank=_int(env, "SLURM_PROCID"), world_size=world, local_rank=_int(env, "SLURM_LOCALID", default=0),
            local_world_size=_slurm_tasks_per_node(env, world, nodes),
            node_rank=_int(env, "SLURM_NODEID", default=0), num_nodes=nodes,
            master_addr=env.get("MASTER_ADDR") or hosts[0],
            master_port=_int(env, "MASTER_PORT", default=_slurm_port(_int(env, "SLURM_JOB_ID", default=0))),
            launcher="slurm")
    elif "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK")
        world = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", default=0)
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", default=world)
        if "MASTER_ADDR" in env and "MASTER_PORT" in env:
            addr, port = env["MASTER_ADDR"], _int(env, "MASTER_PORT")
        elif use_mpi4py:
            addr, port = _mpi_rendezvous(rank, world)
        else:
            raise UserError("MPI launch without MASTER_ADDR/MASTER_PORT needs mpi4py for the rendezvous")
        nodes = max(1, world // max(1, local_world))
        info = WorldInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                         node_rank=rank // max(1, local_world), num_nodes=nodes, master_addr=addr,
                         master_port=port, launcher="mpi")
    else:
        if "SLURM_JOB_ID" in env and "SLURM_STEP_ID" not in env:
            warnings.warn("inside a Slurm allocation but not under srun: running as a single process", stacklevel=2)
        info = WorldInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, num_nodes=1,
                         master_addr="127.0.0.1", master_port=free_port(), launcher="single")
    validate(info)
    return info


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    """The first port the kernel hands out for outgoing connections (32768 on Linux by default)."""
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_is_free(port: int, host: str = "") -> bool:
    """Whether a TCP server could bind `port` on `host` now ("": every interface). With SO_REUSEADDR,
    as torch's TCPStore sets it, so a port merely in TIME_WAIT counts as free."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now ("": every interface), chosen *below* the ephemeral range.

    Why not `bind(0)`: the kernel takes that port from the same range it uses for the local end of
    every outgoing connection, and a process group opens dozens of those (gloo pairs, store
    clients). Between this call and the moment the caller binds the port, any of them can take it,
    and the store then fails with EADDRINUSE (seen in CI with two test workers). Ports below the
    range are only ever taken by an explicit bind, so a random free one stays free in practice.
    """
    low = min(_ephemeral_low(), 65536)
    candidates = range(max(1024, low // 2), low)
    rng = random.Random()  # own generator: a seeded global `random` must not make two runs agree
    for port in (rng.choice(candidates) for _ in range(64 if candidates else 0)):
        if port_is_free(port, host):
            return port
    with socket.socket() as s:  # no room below the range: fall back to the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]


def validate(info: WorldInfo) -> None:
    if not (0 <= info.rank < info.world_size):
        raise UserError(f"rank {info.rank} is outside world size {info.world_size}")
    if info.num_nodes > 1 and info.master_addr.startswith(LOOPBACK):
        # The classic silent failure: every node rendezvous with itself and N worlds of one train apart.
        raise UserError(f"master address {info.master_addr} is a loopback address but the job spans "
                        f"{info.num_nodes} nodes; set MASTER_ADDR to the head node's routable address")


def export_env(info: WorldInfo, env: Optional[MutableMapping[str, str]] = None) -> None:
    """Set the variables torch's env:// rendezvous reads."""
    env = os.environ if env is None else env
    env.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
               LOCAL_WORLD_SIZE=str(info.local_world_size), MASTER_ADDR=info.master_addr,
               MASTER_PORT=str(info.master_port))


def strip_deepspeed_local_rank(argv: list[str]) -> list[str]:
    """The DeepSpeed launcher appends `--local_rank=N`; accept and drop it (LOCAL_RANK is in the env)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(a)
    return out



__all__ = ["WorldInfo", "discover", "expand_nodelist", "export_env", "routable_address", "validate",
           "strip_deepspeed_local_rank"]

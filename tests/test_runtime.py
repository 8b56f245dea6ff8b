"""Runtime: Slurm host lists, world discovery for every launcher, and per-phase collective timeouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from dist_train.errors import DistTimeoutError, UserError
from dist_train.runtime.dist import DistContext
from dist_train.runtime.env import (WorldInfo, discover, expand_nodelist, export_env, free_port,
                                    strip_deepspeed_local_rank)

# ---------------------------------------------------------------------------------- expand_nodelist


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("h1,h2,h3", ["h1", "h2", "h3"]),
    ("login-7", ["login-7"]),
    ("gpu-[001-003]", ["gpu-001", "gpu-002", "gpu-003"]),
    ("node[01-03,07],gpu-a[1-2]", ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("a[1-2]-ib", ["a1-ib", "a2-ib"]),
    ("x[1,3],y", ["x1", "x3", "y"]),
    ("", []),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


# ----------------------------------------------------------------------------------------- discover


def test_discover_torchrun() -> None:
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    assert discover(env) == WorldInfo(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1,
                                      num_nodes=2, master_addr="10.0.0.1", master_port=1234,
                                      launcher="torchrun")


def test_discover_torchrun_single_node_defaults() -> None:
    w = discover({"RANK": "1", "WORLD_SIZE": "2"})
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.num_nodes) == (1, 2, 0, 2, 1)
    assert (w.master_addr, w.master_port, w.launcher) == ("127.0.0.1", 29500, "torchrun")


def _slurm_env(**extra: str) -> dict[str, str]:
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "4(x2)",
           "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_ID": "123456"}
    env.update(extra)
    return env


def test_discover_slurm() -> None:
    w = discover(_slurm_env())
    assert w == WorldInfo(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1, num_nodes=2,
                          master_addr="node01", master_port=12160, launcher="slurm")
    assert w.master_port == 10000 + 123456 % 6384


def test_discover_slurm_port_differs_between_jobs() -> None:
    a = discover(_slurm_env(SLURM_JOB_ID="1000")).master_port
    b = discover(_slurm_env(SLURM_JOB_ID="1001")).master_port
    assert a != b and 10000 <= a < 16384 and 10000 <= b < 16384  # below free_port's and the ephemeral range


def test_discover_slurm_step_nodelist_and_master_override() -> None:
    w = discover(_slurm_env(SLURM_STEP_NODELIST="gpu-[007-008]"))
    assert w.master_addr == "gpu-007"
    w = discover(_slurm_env(MASTER_ADDR="10.9.9.9", MASTER_PORT="4444"))
    assert (w.master_addr, w.master_port) == ("10.9.9.9", 4444)


def test_discover_slurm_complex_nodelist() -> None:
    w = discover(_slurm_env(SLURM_JOB_NODELIST="rack[3-4]n[1-2],spare", SLURM_NNODES="5"))
    assert w.master_addr == "rack3n1" and w.num_nodes == 5


def test_discover_slurm_empty_nodelist() -> None:
    with pytest.raises(UserError, match="SLURM_JOB_NODELIST is empty"):
        discover(_slurm_env(SLURM_JOB_NODELIST=""))


def test_discover_mpi_openmpi() -> None:
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "2222"}
    assert discover(env, use_mpi4py=False) == WorldInfo(
        rank=3, world_size=4, local_rank=1, local_world_size=2, node_rank=1, num_nodes=2,
        master_addr="10.1.1.1", master_port=2222, launcher="mpi")


def test_discover_mpi_pmi() -> None:
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "2223"}
    w = discover(env, use_mpi4py=False)
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.num_nodes, w.launcher) == \
        (1, 2, 0, 2, 1, "mpi")
    assert (w.master_addr, w.master_port) == ("127.0.0.1", 2223)


def test_discover_mpi_without_rendezvous_info() -> None:
    with pytest.raises(UserError, match="MASTER_ADDR/MASTER_PORT"):
        discover({"PMI_RANK": "0", "PMI_SIZE": "2"}, use_mpi4py=False)


def test_discover_single_process() -> None:
    w = discover({})
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.node_rank, w.num_nodes) == (0, 1, 0, 1, 0, 1)
    assert w.launcher == "single" and w.master_addr == "127.0.0.1"
    assert 0 < w.master_port < 65536


def test_discover_inside_slurm_allocation_without_srun_warns() -> None:
    with pytest.warns(UserWarning, match="not under srun"):
        w = discover({"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert w.launcher == "single"


def test_discover_precedence_torchrun_over_slurm() -> None:
    env = _slurm_env(RANK="0", WORLD_SIZE="1")
    assert discover(env).launcher == "torchrun"


@pytest.mark.parametrize("addr", ["127.0.0.1", "localhost", "127.0.1.1", "0.0.0.0"])
def test_loopback_master_with_several_nodes_is_an_error(addr: str) -> None:
    env = {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": addr, "MASTER_PORT": "1"}
    with pytest.raises(UserError) as info:
        discover(env)
    msg = str(info.value)
    assert addr in msg and "loopback" in msg and "2 nodes" in msg and "\n" not in msg


def test_loopback_master_under_slurm_is_an_error() -> None:
    with pytest.raises(UserError, match="loopback"):
        discover(_slurm_env(MASTER_ADDR="localhost"))


def test_loopback_master_on_one_node_is_fine() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1"}
    assert discover(env).num_nodes == 1


def test_rank_outside_world() -> None:
    with pytest.raises(UserError, match="rank 4 is outside world size 4"):
        discover({"RANK": "4", "WORLD_SIZE": "4"})


def test_non_integer_env_var() -> None:
    with pytest.raises(UserError) as info:
        discover({"RANK": "zero", "WORLD_SIZE": "2"})
    assert str(info.value) == "environment variable RANK: expected an integer, got 'zero'"


def test_export_env() -> None:
    env: dict[str, str] = {}
    export_env(WorldInfo(rank=3, world_size=4, local_rank=1, local_world_size=2, node_rank=1, num_nodes=2,
                         master_addr="node01", master_port=18456, launcher="slurm"), env)
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "node01", "MASTER_PORT": "18456"}


@pytest.mark.parametrize("argv, expected", [
    (["run", "c.yaml", "--local_rank=3", "a=1"], ["run", "c.yaml", "a=1"]),
    (["--local_rank", "2", "run", "c.yaml"], ["run", "c.yaml"]),
    (["run", "--local-rank=0", "c.yaml"], ["run", "c.yaml"]),
    (["run", "c.yaml", "--local-rank", "1"], ["run", "c.yaml"]),
    (["launch", "c.yaml", "--nproc", "2"], ["launch", "c.yaml", "--nproc", "2"]),
])
def test_strip_deepspeed_local_rank(argv: list[str], expected: list[str]) -> None:
    assert strip_deepspeed_local_rank(argv) == expected


# ------------------------------------------------------------------------- phases (no process group)


def _ctx() -> DistContext:
    import torch

    world = WorldInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, num_nodes=1,
                      master_addr="127.0.0.1", master_port=1, launcher="single")
    return DistContext(world=world, device=torch.device("cpu"), backend=None,
                       timeouts={"start": 600.0, "steady": 3.0, "save": 1800.0})


def test_phase_turns_timeouts_into_dist_timeout_error() -> None:
    ctx = _ctx()
    with pytest.raises(DistTimeoutError) as info:
        with ctx.phase("steady"):
            assert ctx.current_phase == "steady"
            raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv")
    msg = str(info.value)
    assert "rank 0" in msg and "'steady'" in msg and "3.0s" in msg
    assert ctx.current_phase == "start"


def test_phase_passes_other_errors_through() -> None:
    ctx = _ctx()
    with pytest.raises(RuntimeError, match="shape mismatch") as info:
        with ctx.phase("save"):
            raise RuntimeError("shape mismatch")
    assert not isinstance(info.value, DistTimeoutError)
    assert ctx.current_phase == "start"


def test_phases_nest_and_restore() -> None:
    ctx = _ctx()
    with ctx.phase("steady"):
        with ctx.phase("save"):
            assert ctx.current_phase == "save"
        assert ctx.current_phase == "steady"
    assert ctx.current_phase == "start"


# ------------------------------------------------------------------- real per-phase timeout (gloo)

_TIMEOUT_WORKER = textwrap.dedent("""
    import json, os, sys, time
    from dist_train.config import Config
    from dist_train.errors import DistTimeoutError
    from dist_train.runtime.dist import init_distributed

    cfg = Config.model_validate({"runtime": {"steady_timeout_s": 3, "start_timeout_s": 60, "threads": 1},
                                 "parallel": {"backend": "ddp"}})
    ctx = init_distributed(cfg)
    ctx.barrier()  # both ranks are up: the start phase is over
    out = {"rank": ctx.rank, "backend": ctx.backend}
    t0 = time.monotonic()
    try:
        with ctx.phase("steady"):
            if ctx.rank == 0:
                ctx.barrier()
            else:
                print("sleeping", flush=True)
                time.sleep(20)
        out["error"] = None
    except Exception as e:
        out.update(error=type(e).__name__, message=str(e), cause=repr(e.__cause__))
    out["elapsed"] = time.monotonic() - t0
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)
""")


def _clean_env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
            "MASTER_PORT", "DIST_TRAIN_ERROR_DIR")
    return {k: v for k, v in os.environ.items()
            if k not in drop and not k.startswith(("SLURM_", "OMPI_", "PMI_", "TORCHELASTIC_"))}


@pytest.mark.serial  # asserts the wall time of the timeout
@pytest.mark.timeout(90)
def test_steady_phase_timeout_names_rank_and_phase(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_TIMEOUT_WORKER)
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = _clean_env()
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        out0, err0 = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.communicate()
    results = [json.loads(line[len("RESULT "):]) for line in out0.splitlines() if line.startswith("RESULT ")]
    assert results, f"rank 0 reported nothing\nstdout:\n{out0}\nstderr:\n{err0}"
    r = results[0]
    assert r["rank"] == 0 and r["backend"] == "gloo"
    assert r["error"] == "DistTimeoutError", (
        f"gloo's timeout was not recognised as one (keyword list in dist_train/runtime/dist.py): {r}")
    assert "rank 0" in r["message"] and "phase 'steady'" in r["message"], r["message"]
    assert "after 3.0s" in r["message"], r["message"]  # the phase's timeout, not the start-up one
    assert 2.0 <= r["elapsed"] < 10.0, r


# ---------------------------------------------------------------------------------------- free_port


def test_free_port_is_below_the_ephemeral_range_and_bindable() -> None:
    """Ports from the ephemeral range can be taken by any outgoing connection before the caller
    binds them (EADDRINUSE in CI); `free_port` must stay below it and hand out a port that binds."""
    import socket

    from dist_train.runtime import env as env_mod

    low = env_mod._ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= p < low for p in ports), (ports, low)
    assert len(ports) > 1  # random, so two launches in parallel do not pick the same one
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))


def test_free_port_falls_back_to_the_kernel_when_no_room_below_the_range(monkeypatch, tmp_path: Path) -> None:
    from dist_train.runtime import env as env_mod

    fake = tmp_path / "range"
    fake.write_text("1024\t60999\n")
    monkeypatch.setattr(env_mod, "_EPHEMERAL_RANGE", fake)
    assert env_mod._ephemeral_low() == 1024
    assert free_port() >= 1024  # bind(0) fallback: any port the kernel gives is fine


# ------------------------------------------------------------------------------------- agent store


def test_agent_store_keys_each_restart_apart(monkeypatch) -> None:
    """A restarted worker group must not read the dead group's keys from the agent's one store."""
    import torch.distributed as dist

    from dist_train.runtime.dist import _agent_store

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    world = WorldInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, num_nodes=1,
                      master_addr="127.0.0.1", master_port=port, launcher="torchrun")
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert _agent_store(world, timedelta(seconds=5)) is None  # outside the agent: env:// as usual

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = _agent_store(world, timedelta(seconds=5))
    first.set("rank_0_addr", "dead")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = _agent_store(world, timedelta(seconds=5))
    assert not second.check(["rank_0_addr"])  # the restart sees none of attempt 0's keys
    second.set("rank_0_addr", "alive")
    assert first.get("rank_0_addr") == b"dead"
    assert server.num_keys() >= 2

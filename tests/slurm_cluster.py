"""A real one-node Slurm cluster for the tests: munged, slurmctld and slurmd started from a temporary
folder, and stopped again (exactly those three processes).

Debian's `slurm-wlm` and `munge` are installed when missing (CI runs as root; elsewhere the tests
fail with the command to run). Nothing outside the temporary folder is configured: the daemons get
`-f <tmp>/slurm.conf`, the clients `SLURM_CONF`, munge its own key and socket; ports are free ones.
Process tracking is `proctrack/linuxproc` (no cgroups needed), one node with this machine's CPUs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import pytest

from dist_train.runtime.env import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed() -> None:
    if not _missing():
        return
    if os.geteuid() != 0:
        pytest.fail(f"Slurm is not installed ({', '.join(_missing())} missing); as root: "
                    "apt-get install -y slurm-wlm munge", pytrace=False)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:  # a stale package index: refresh once and try again
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], env=env,
                              capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or _missing():
        pytest.fail(f"could not install slurm-wlm and munge:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}",
                    pytrace=False)


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm clients (and for `dist-train slurm`, which calls sbatch)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def start(self) -> "SlurmCluster":
        r = self.root
        for d in ("state", "spool"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge.sock"
        self._spawn([_sbin("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                     f"--pid-file={r / 'munged.pid'}", f"--log-file={r / 'munged.log'}",
                     f"--seed-file={r / 'munged.seed'}"], "munged")
        self._wait(lambda: sock.exists(), 20, "munged did not create its socket")
        self.conf.write_text(f"""\
ClusterName=dt-test
SlurmctldHost={self.host}
SlurmctldPort={free_port("")}
SlurmdPort={free_port("")}
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=30
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName={self.host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn([_sbin("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld")
        self._spawn([_sbin("slurmd"), "-D", "-f", str(self.conf)], "slurmd")
        self._wait(lambda: "idle" in self.run(["sinfo", "-h", "-o", "%t"]).stdout, 60,
                   "the node did not become idle")
        return self

    def _spawn(self, argv: list[str], name: str) -> None:
        log = open(self.root / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            if ready():
                return
            time.sleep(0.3)
        logs = "\n".join(f"--- {f.name}\n{f.read_text()[-1500:]}" for f in sorted(self.root.glob("*.out")))
        self.stop()
        pytest.fail(f"Slurm test cluster: {what}\n{logs}", pytrace=False)

    def run(self, argv: list[str], check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def job_state(self, job: str) -> dict[str, str]:
        out = self.run(["scontrol", "show", "job", job]).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_job(self, job: str, states: tuple[str, ...], timeout: float) -> Optional[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job_state(job)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        return None

    def stop(self) -> None:
        for p in reversed(self.procs):  # slurmd, slurmctld, munged
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

"""A real one-node Slurm cluster (Debian's slurmctld, slurmd, munge) for the recipe tests.

Configuration from ../shared/reference/cpu-findings.md: proctrack/linuxproc, task/none, no
cgroup.conf, JobRequeue=1, every state/spool/log path under a temporary directory. Packages are
installed with apt-get when missing and running as root; otherwise the tests skip with a reason.
Only the daemons started here are stopped, by their process ids.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "munged"]


def _ensure_packages() -> None:
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"needs a one-node Slurm: install {' '.join(PACKAGES)} (apt-get, as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd, limit in ((["apt-get", "update"], 180), (["apt-get", "install", "-y", *PACKAGES], 300)):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
        if proc.returncode != 0 and cmd[1] == "install":
            pytest.skip(f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr[-500:]}")
    if not all(shutil.which(b) for b in BINARIES):
        pytest.skip(f"installed {' '.join(PACKAGES)} but {[b for b in BINARIES if not shutil.which(b)]} missing")


@dataclass
class Slurm:
    root: Path
    env: dict[str, str]

    def run(self, *cmd: str, timeout: float = 30) -> str:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(item.split("=", 1) for item in out.split() if "=" in item)


def start_cluster(root: Path, cpus: int):
    """Start munged, slurmctld and slurmd; returns (Slurm, list of Popen to stop)."""
    _ensure_packages()
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=prismtest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "JobRequeue=1", "MpiDefault=none", "ReturnToService=2",
        "SlurmctldPort=16817", "SlurmdPort=16818", "MinJobAge=600", "KillWait=5",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        f"NodeName={host} CPUs={cpus} State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""]))
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = root / "munge" / "munge.socket"
    env = dict(os.environ, SLURM_CONF=str(conf))
    procs = [subprocess.Popen(["munged", "--force", "--foreground", f"--key-file={key}", f"--socket={socket_path}",
                               f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/munge/munged.log",
                               f"--seed-file={root}/munge/munged.seed"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]
    # Slurm's munge plugin reads the socket from AuthInfo.
    conf.write_text(conf.read_text() + f"AuthInfo=socket={socket_path}\n")
    deadline = time.monotonic() + 20
    while not socket_path.exists():
        assert time.monotonic() < deadline, "munged did not start"
        time.sleep(0.1)
    for daemon in ("slurmctld", "slurmd"):
        procs.append(subprocess.Popen([daemon, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT))
        time.sleep(1)
    slurm = Slurm(root, env)
    deadline = time.monotonic() + 60
    while True:
        try:
            if "idle" in slurm.run("sinfo", "-h", "-o", "%t"):
                return slurm, procs
        except (AssertionError, subprocess.TimeoutExpired):
            pass
        if time.monotonic() > deadline:
            logs = "\n".join((root / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log") if (root / f).exists())
            stop_cluster(procs)
            raise AssertionError(f"Slurm node not idle within 60 s:\n{logs}")
        time.sleep(0.5)


def stop_cluster(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

"""A real SLURM cluster on this machine, for tests: munged + slurmctld + two slurmd "nodes".

Debian's packages (slurm-wlm, munge) are installed when missing. Every file of the cluster (keys,
sockets, state, spool, logs) lives in one temporary directory; clients find it through SLURM_CONF.
The two nodes, n1 and n2, are this host on 127.0.0.1 with one CPU each, so a 2-node job runs one
process per "node" exactly as it would across machines.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List

PACKAGES = ("slurm-wlm", "munge")
NODES = ("n1", "n2")


class SlurmUnavailable(RuntimeError):
    """The packages could not be installed (no root, no registry): the tests skip with this reason."""


def ensure_installed() -> None:
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm and munge are not installed and apt-get cannot run here (needs root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 and command[1] == "install":
            raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self._daemons: List[subprocess.Popen] = []

    @property
    def env(self) -> Dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    # -- start / stop ----------------------------------------------------------------------------
    def start(self) -> "LocalSlurmCluster":
        ensure_installed()
        self._start_munge()
        self._write_conf()
        self._daemons.append(self._spawn(["slurmctld", "-D", "-f", str(self.conf)], "slurmctld"))
        for node in NODES:
            self._daemons.append(self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", node], f"slurmd-{node}"))
        self.wait_until_idle()
        return self

    def stop(self) -> None:
        for job in self.squeue_ids():
            subprocess.run(["scancel", job], env=self.env, capture_output=True)
        for daemon in reversed(self._daemons):
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
        for daemon in self._daemons:
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
        self._daemons.clear()

    def _spawn(self, command: List[str], name: str) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        return subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def _start_munge(self) -> None:
        munge_dir = self.root / "munge"
        munge_dir.mkdir(parents=True)
        munge_dir.chmod(0o755)  # clients must reach the socket
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        command = ["munged", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                   f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                   f"--seed-file={munge_dir / 'munged.seed'}", "--foreground"]
        (self.root / "log").mkdir(exist_ok=True)
        self._daemons.append(self._spawn(command, "munged"))
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {(munge_dir / 'munged.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        state = self.root / "state"
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        host = socket.gethostname()
        first = _consecutive_ports(len(NODES))  # one NodeName range takes consecutive slurmd ports
        lines = [
            "ClusterName=kinotest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            "MinJobAge=600",
            "KillWait=30",
            "JobRequeue=1",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={self.root / 'spool'}/%n",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName=n[1-{len(NODES)}] NodeHostname={host} NodeAddr=127.0.0.1 "
            f"Port=[{first}-{first + len(NODES) - 1}] CPUs=1 RealMemory=4000 State=UNKNOWN",
            f"PartitionName=debug Nodes=n[1-{len(NODES)}] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def wait_until_idle(self, timeout: float = 60) -> None:
        """Every node idle: no job, and nothing left of one being cleaned up."""
        count = len(NODES)
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            out = done.stdout + done.stderr
            idle = [line for line in done.stdout.splitlines() if line.split()[-1:] == ["idle"]]
            if len(idle) >= count:
                time.sleep(1)  # slurmd finishes its own bookkeeping just after reporting idle
                return
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-1500:] for p in sorted((self.root / "log").glob("*")) if p.is_file())
        raise RuntimeError(f"SLURM nodes not idle after {timeout}s: {out}\n{logs}")

    # -- queries used by the tests ---------------------------------------------------------------
    def squeue_ids(self) -> List[str]:
        done = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
        return done.stdout.split()

    def job(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, Reason, ...); {} once the job is forgotten."""
        done = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True, text=True)
        fields: Dict[str, str] = {}
        for token in done.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_for(self, job_id: str, states, timeout: float, after_restarts: int = 0) -> Dict[str, str]:
        deadline = time.monotonic() + timeout
        info: Dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states and int(info.get("Restarts", "0")) >= after_restarts:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {info}")

    def update(self, job_id: str, *settings: str) -> None:
        """`scontrol update`, e.g. StartTime=now: a requeued job otherwise waits ~2 minutes to start again."""
        subprocess.run(["scontrol", "update", f"JobId={job_id}", *settings], env=self.env, check=True,
                       capture_output=True)


def _consecutive_ports(count: int, start: int = 17001) -> int:
    for first in range(start, start + 2000, count):
        try:
            sockets = []
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no consecutive free ports for slurmd")


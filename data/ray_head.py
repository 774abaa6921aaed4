"""Ray processes a run starts for itself, each `ray start --block` in a session of its own.

Its own session matters for stopping: torchrun passes a stop signal to each rank's whole process group, and
a Ray that rank 0 started inside its own group (ray.init(address="local")) died with that signal before the
ranks had written their final checkpoint, which needs the data plan Ray holds. The cluster launchers
(launch/node.py) start their Ray the same way; `python -m launch local` and a bare torchrun get a private one
from rank 0 (data/coordinator.py).
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

RAY_READY = "This command will now block forever"


def tool_beside_python(name: str) -> str:
    """A console script of this environment (ray, deepspeed), found even when the venv is not on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def start_ray_process(command: List[str], timeout: float, stop_with_parent: bool = False) -> subprocess.Popen:
    """Run `ray start --block ...` in its own session and wait until it says it is up."""
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"), RAY_USAGE_STATS_ENABLED="0")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True,  # its own process group: stopped as one at the end
                               preexec_fn=_stop_when_parent_dies if stop_with_parent else None)
    ready = threading.Event()
    tail: List[str] = []

    def pump() -> None:
        for line in process.stdout:
            tail.append(line)
            del tail[:-40]
            if RAY_READY in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(timeout=1):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process_group(process)
            raise RuntimeError("ray start failed:\n" + "".join(tail))
    return process


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server about to bind it: below the kernel's ephemeral range where
    there is room. A port the kernel hands out for port 0 and that is closed again can be handed to the next
    process that binds port 0 (a Ray worker, gloo, an HTTP client) before the server binds it: EADDRINUSE, seen in
    clean-clone runs of the suite for a rendezvous store and for a Ray head's GCS. Ports below the range are never
    handed out that way."""
    import random

    low = _ephemeral_range_start()
    if low > 12000:
        for _ in range(100):
            port = random.randrange(max(10000, low - 12000), low)
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    with socket.socket() as probe:  # no room below the range (or all taken): the kernel's pick
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ephemeral_range_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def start_private_head(object_store_bytes: int, timeout: float = 120.0, num_cpus: int = 1
                       ) -> Tuple[subprocess.Popen, str]:
    """A Ray head of `num_cpus` CPUs (the data coordinator's actor needs none) on a free local port, killed when
    this process exits (or dies). Killed, not stopped: by then the run has checkpointed the data plan, and nothing
    in the head is kept; `ray start`'s own stop took 2 s at the end of every run."""
    port = free_local_port()
    command = [tool_beside_python("ray"), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
               "--include-dashboard=false", f"--object-store-memory={object_store_bytes}", "--disable-usage-stats",
               "--node-ip-address=127.0.0.1"]
    process = start_ray_process(command, timeout, stop_with_parent=True)
    atexit.register(stop_process_group, process, 0.0)
    return process, f"127.0.0.1:{port}"


def stop_process_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to `ray start` alone, which then stops the Ray processes it started (about 2 s), then SIGKILL to
    whatever of its group is left. When its raylet is already gone (a scancel or a preemption signals every
    process of a job, Ray's too), `ray start` no longer stops on SIGTERM: it held the whole grace, 10 s of every
    such stop. Then the group is killed at once; nothing in it keeps state the run needs (the trainer checkpoints
    the data plan itself)."""
    if _raylet_alive(process.pid):  # else `ray start` no longer stops on SIGTERM: kill it now
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def group_processes(group: int) -> Optional[List[Tuple[int, str, str]]]:
    """Every process of process group `group` as (pid, name, state: "Z" for a zombie), read from /proc; None
    where there is no /proc."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, _, rest = stat.partition("(")[2].rpartition(")")
        fields = rest.split()
        if len(fields) > 2 and fields[2] == str(group):
            members.append((int(entry.name), name, fields[0]))
    return members


def _raylet_alive(group: int) -> bool:
    """Whether process group `group` (a `ray start --block` and its children) still has a raylet that is not a
    zombie. Without /proc, say yes (the stop then waits its grace, as before)."""
    members = group_processes(group)
    return members is None or any(name == "raylet" and state != "Z" for _, name, state in members)


def connect(address: str, namespace: Optional[str]) -> None:
    """This process's Ray driver, joined to the cluster at `address`. Ray's task events are off unless the
    environment turns them on: nothing here reads them, and with them on, a driver whose cluster is already gone (a
    scancel or a preemption stops Ray with the ranks) waits 5 s at exit to flush them (`ray.shutdown`)."""
    import ray

    os.environ.setdefault("RAY_task_events_report_interval_ms", "0")
    ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="ERROR")


def _stop_when_parent_dies() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass

"""The per-node agent: one per node under SLURM (`srun`) and in every Kubernetes pod.

    python -m launch.node --nodes N --procs P --head ADDR (--node-rank R | --node-rank-from ENV) \
        [--rdzv-port ..] [--ray-port ..] [--run-id ..] -- <overrides for -m train>

It starts this node's part of the Ray cluster (the head on node 0, a worker joining it elsewhere) for
the data coordinator, then `torchrun --rdzv-backend c10d --rdzv-endpoint ADDR:PORT -m train ...`, and
passes the scheduler's stop signals on to torchrun. When training ends it stops Ray and exits with
torchrun's status. Ray runs as a child, not as a daemon, so nothing outlives the job.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from typing import List, Optional

from data.ray_head import start_ray_process, stop_process_group, tool_beside_python
from launch.processes import as_stop_signal, exit_status, shutdown_timeout_args

LAUNCHER_OWNED = ("data.coordinator=", "data.ray_address=")


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.node", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--procs", type=int, required=True, help="training processes on this node")
    parser.add_argument("--head", required=True, help="address of node 0 (rendezvous and Ray head)")
    rank = parser.add_mutually_exclusive_group(required=True)
    rank.add_argument("--node-rank", type=int)
    rank.add_argument("--node-rank-from", metavar="ENV", help="environment variable holding this node's rank")
    parser.add_argument("--rdzv-port", type=int, default=29500)
    parser.add_argument("--ray-port", type=int, default=6379)
    parser.add_argument("--ray-cpus", type=int, default=1)
    parser.add_argument("--ray-object-store-mb", type=int, default=1024)
    parser.add_argument("--run-id", default="kino")
    parser.add_argument("--connect-timeout", type=float, default=600.0)
    parser.add_argument("--stop-grace", type=int, default=300,
                        help="seconds torchrun gives its ranks to checkpoint after a stop signal")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args(argv)


def node_rank(args: argparse.Namespace) -> int:
    if args.node_rank is not None:
        return args.node_rank
    value = os.environ.get(args.node_rank_from)
    if value is None or not value.isdigit():
        raise SystemExit(f"launch.node: ${args.node_rank_from} does not hold a node rank (got {value!r})")
    return int(value)


def say(message: str) -> None:
    print(f"[kino node {socket.gethostname()}] {message}", flush=True)


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as error:
            if time.monotonic() > deadline:
                raise SystemExit(f"launch.node: {host}:{port} did not answer within {timeout:.0f}s ({error})")
            time.sleep(1)


def start_ray(args: argparse.Namespace, is_head: bool) -> subprocess.Popen:
    command = [tool_beside_python("ray"), "start", "--block", f"--num-cpus={args.ray_cpus}",
               f"--object-store-memory={args.ray_object_store_mb * 2 ** 20}", "--disable-usage-stats"]
    if is_head:
        command += ["--head", f"--port={args.ray_port}", "--include-dashboard=false"]
    else:
        wait_for_port(args.head, args.ray_port, args.connect_timeout)
        command += [f"--address={args.head}:{args.ray_port}"]
    try:
        process = start_ray_process(command, args.connect_timeout)
    except RuntimeError as error:
        raise SystemExit(f"launch.node: {error}")
    say(f"Ray {'head' if is_head else 'worker'} up ({args.head}:{args.ray_port})")
    return process


def torchrun_command(args: argparse.Namespace, rank: int) -> List[str]:
    overrides = [o for o in args.overrides if not o.startswith(LAUNCHER_OWNED)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={args.nodes}", f"--nproc-per-node={args.procs}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={args.head}:{args.rdzv_port}", f"--rdzv-id={args.run_id}",
            # Only node 0 hosts the rendezvous store: deciding by host name fails when nodes share a host
            # name or an address (containers, this project's single-machine SLURM test cluster).
            f"--rdzv-conf=is_host={'true' if rank == 0 else 'false'}", "--max-restarts=0",
            *shutdown_timeout_args(args.stop_grace), "-m", "train", *overrides,
            "data.coordinator=ray", f"data.ray_address={args.head}:{args.ray_port}"]


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    rank = node_rank(args)
    say(f"node {rank} of {args.nodes}, {args.procs} process(es); head {args.head}")
    trainer: Optional[subprocess.Popen] = None
    received: List[int] = []

    def pass_on(signum, frame) -> None:
        received.append(as_stop_signal(signum))
        if trainer is not None and trainer.poll() is None:
            trainer.send_signal(received[-1])

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, pass_on)  # first: a pod may be stopped while it waits for the Ray head
    ray = start_ray(args, is_head=rank == 0)
    try:
        if received:
            say("stopped before training started")
            return 128 + received[-1]
        trainer = subprocess.Popen(torchrun_command(args, rank))
        status = exit_status(trainer.wait())
    finally:
        stop_process_group(ray)
    say(f"training exited with status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())

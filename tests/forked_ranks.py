"""Test-only: run a torchrun command's ranks as forks of a process that has already imported torch, DeepSpeed,
Ray and Kino.

On the 2-core machine a rank spends about 7 s importing (torch, then Dynamo and Inductor, which DeepSpeed's ZeRO
code imports on the first step) before its first line of Kino, and torchrun's agent 2 s more: most of a tiny
run. `run_ranks(command, ...)` takes the very command a test would give `subprocess.run` (`python -m
torch.distributed.run --standalone --nproc_per_node=N -m MODULE ARGS...`, or `python -m MODULE ARGS...` for a
world of one) and runs the same entry point with the same arguments, environment and working directory, in N
real processes that rendezvous over gloo on a free port exactly as torchrun's ranks do (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...). Like torchrun, when one rank fails the others are stopped. Unlike
torchrun, the output comes back rank by rank (rank 0's lines, then rank 1's, ...), never interleaved.

What this does not run is torchrun itself: its agent, its restarts, its signal forwarding and its error summary
("exitcode : 3"). Tests about those keep the real command (the launch, SLURM, SIGTERM and exit-code tests), and
`KINO_TEST_TORCHRUN=1` runs every command through the real torchrun instead.

The forking server is started once per pytest process (a pytest-xdist worker has its own) and stopped at exit. It
stays single-threaded Python with nothing initialised but imports, which is what makes fork safe here: the same
condition PyTorch's DataLoader relies on when it forks its workers.
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

PRELOAD = ("torch", "torch.distributed", "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer", "ray",
           "hydra", "omegaconf", "conf.schema", "data.decode", "data.coordinator", "train.trainer", "train.main",
           "train.engine", "train.parallelize")
TORCHRUN = ("-m", "torch.distributed.run")


def parse(command: Sequence[str]) -> Optional[Tuple[int, List[str], bool]]:
    """(processes, entry, under_torchrun) of a torchrun or `python -m` command, where entry is ['-m', module,
    args...] or [script, args...]; None for any other command."""
    words = list(command)
    if len(words) < 3 or words[0] != sys.executable:
        return None
    if tuple(words[1:3]) != TORCHRUN:
        return (1, words[1:], False) if words[1] == "-m" else None
    nproc, rest = 1, words[3:]
    while rest and rest[0].startswith("--"):
        option = rest.pop(0)
        if option.startswith("--nproc_per_node=") or option.startswith("--nproc-per-node="):
            nproc = int(option.split("=", 1)[1])
        elif option != "--standalone":
            return None  # multi-node or elastic options: only the real torchrun runs those
    return (nproc, rest, True) if rest else None


# ----------------------------------------------------------------------------------------------------- the server


def _rank_process(entry: List[str], env: Dict[str, str], cwd: str, rank: int, nproc: int, torchrun: bool,
                  port: int, out: int, err: int) -> None:
    """In the forked rank: torchrun's environment, then the entry point as `python -m`/`python script` runs it."""
    import random
    import runpy
    import traceback

    os.dup2(out, 1)
    os.dup2(err, 2)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if torchrun:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                          LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RESTART_COUNT="0",
                          TORCHELASTIC_MAX_RESTARTS="0", TORCHELASTIC_RUN_ID="forked")
    random.seed()  # a fresh interpreter draws its own seeds; forks would share the server's
    try:
        import numpy

        numpy.random.seed()
    except ImportError:
        pass
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    code = 0
    try:
        if entry[0] == "-m":
            sys.argv = [entry[1], *entry[2:]]
            sys.modules.pop(entry[1], None)  # a fresh interpreter has not imported it (runpy warns if it is)
            runpy.run_module(entry[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(entry)
            sys.path[0] = str(Path(entry[0]).resolve().parent)
            runpy.run_path(entry[0], run_name="__main__")
    except SystemExit as stop:
        if isinstance(stop.code, int) or stop.code is None:
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _run_group(entry: List[str], nproc: int, torchrun: bool, env: Dict[str, str], cwd: str, out_path: str,
               err_path: str) -> int:
    """The agent: fork the ranks, wait for them, stop the rest when one fails (as torchrun does); torchrun's exit
    status (0, or 1 when a rank failed)."""
    os.setpgrp()
    from data.ray_head import free_local_port

    port = free_local_port()  # below the ephemeral range: no other process is handed it meanwhile
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    err = os.open(err_path, flags, 0o644)  # the agent's own lines
    ranks = []
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            # a file per rank: unbuffered ranks writing to one file interleave word by word
            _rank_process(entry, env, cwd, rank, nproc, torchrun, port, os.open(f"{out_path}.{rank}", flags, 0o644),
                          os.open(f"{err_path}.{rank}", flags, 0o644))
        ranks.append(pid)
    codes: Dict[int, int] = {}
    stop_at = None
    while len(codes) < nproc:
        if stop_at is not None and time.monotonic() > stop_at:
            for pid in set(ranks) - set(codes):
                os.kill(pid, signal.SIGKILL)
        pid, status = os.waitpid(-1, os.WNOHANG) if stop_at is not None else os.waitpid(-1, 0)
        if pid == 0:
            time.sleep(0.1)
            continue
        if pid not in ranks:
            continue
        codes[pid] = os.waitstatus_to_exitcode(status)
        if not torchrun:
            return codes[pid]  # a plain `python -m`: its own exit status
        if codes[pid] != 0 and stop_at is None:
            os.write(err, f"[forked ranks] rank {ranks.index(pid)} exited with {codes[pid]}: stopping the others\n"
                     .encode())
            for other in set(ranks) - set(codes):
                os.kill(other, signal.SIGTERM)
            stop_at = time.monotonic() + 15
    return 0 if all(code == 0 for code in codes.values()) else 1


def serve(address: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    listener = Listener(address, family="AF_UNIX")
    print("ready", flush=True)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)  # nobody reads the pipe after "ready"
    os.dup2(quiet, 2)
    while True:
        connection = listener.accept()
        request = connection.recv()
        if request == "stop":
            connection.close()
            break
        agent = os.fork()
        if agent == 0:
            listener.close()
            try:
                code = _run_group(**request)
            except BaseException as error:  # noqa: BLE001 - reported to the test, never swallowed
                code = 1
                with open(request["err_path"], "a") as err:
                    err.write(f"[forked ranks] agent failed: {error!r}\n")
            os._exit(code)
        connection.send(agent)
        _, status = os.waitpid(agent, 0)
        try:
            connection.send(os.waitstatus_to_exitcode(status))
        except OSError:
            pass  # the test gave up on this run (its timeout) and closed the connection
        connection.close()


# ----------------------------------------------------------------------------------------------------- the client

_SERVER: Dict[str, object] = {}


def _server_address() -> str:
    if "address" not in _SERVER:
        folder = tempfile.mkdtemp(prefix="kino-forked-ranks-")
        address = os.path.join(folder, "socket")
        repo = str(Path(__file__).resolve().parents[1])
        process = subprocess.Popen([sys.executable, "-m", "tests.forked_ranks", address], cwd=repo,
                                   stdout=subprocess.PIPE, text=True,
                                   env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo))
        lines = []
        for line in process.stdout:  # imports may log to stdout before the server says it is ready
            if line.strip() == "ready":
                break
            lines.append(line)
        else:
            raise RuntimeError(f"the forking server did not start (exit {process.wait()}):\n" + "".join(lines))
        _SERVER.update(address=address, process=process)
        atexit.register(stop_server)
    return _SERVER["address"]


def stop_server() -> None:
    process = _SERVER.pop("process", None)
    address = _SERVER.pop("address", None)
    if process is None:
        return
    try:
        with Client(address, family="AF_UNIX") as connection:
            connection.send("stop")
        process.wait(timeout=10)
    except Exception:  # noqa: BLE001
        process.kill()


def run_ranks(command: Sequence[str], cwd, env: Optional[Dict[str, str]] = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """`subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)`, with the ranks
    forked from the preloaded server when `command` is a plain torchrun or `python -m` command (see the module's
    docstring); any other command, or KINO_TEST_TORCHRUN=1, runs as given."""
    parsed = parse(command)
    if parsed is None or os.environ.get("KINO_TEST_TORCHRUN") == "1":
        return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    nproc, entry, torchrun = parsed
    with tempfile.TemporaryDirectory(prefix="kino-ranks-") as folder:
        out_path, err_path = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        request = dict(entry=entry, nproc=nproc, torchrun=torchrun, env=dict(os.environ if env is None else env),
                       cwd=str(cwd), out_path=out_path, err_path=err_path)
        with Client(_server_address(), family="AF_UNIX") as connection:
            connection.send(request)
            agent = connection.recv()
            if not connection.poll(timeout):
                os.killpg(agent, signal.SIGKILL)
                raise subprocess.TimeoutExpired(list(command), timeout, _joined(out_path, nproc))
            code = connection.recv()
        return subprocess.CompletedProcess(list(command), code, _joined(out_path, nproc), _joined(err_path, nproc))


def _joined(path: str, nproc: int) -> str:
    """Every rank's output, rank 0 first (then the agent's own lines): each rank's lines whole and in order."""
    parts = [Path(f"{path}.{rank}") for rank in range(nproc)] + [Path(path)]
    return "".join(part.read_text(errors="replace") for part in parts if part.exists())


if __name__ == "__main__":
    serve(sys.argv[1])

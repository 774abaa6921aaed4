"""`python -m launch local` and `python -m launch deepspeed`: real runs on this machine, and the stop-by-signal
path a Kubernetes eviction takes (SIGTERM to the pod's process, passed on to every rank)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO, free_port, shared_ray_address
from tests.exactly_once import assert_exactly_once
from tests.integration.test_training import TINY

ENV = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
# Long enough that a stop signal lands mid-run (after STOP_AFTER logged steps), short enough that the resumed
# launch finishes quickly: 12 + 3 steps, checkpoints only at the end, so the stop's checkpoint is the signal's.
LONGER = ("curriculum.stages.0.steps=12", "train.checkpoint_every=1000")
TOTAL, STOP_AFTER = 15, 3


def launch(scheduler: str, dataset: Path, run_dir: Path, *overrides: str, private_ray: bool = False):
    """W&B off and the session's Ray head, unless the test is about them (it passes tracking.mode, private_ray)."""
    words = list(overrides)
    if not private_ray:
        words.append(f"data.ray_address={shared_ray_address()}")
    if not any(w.startswith("tracking.mode=") for w in words):
        words.append("tracking.mode=disabled")
    return [sys.executable, "-m", "launch", scheduler, "experiment=demo", f"data.root={dataset}",
            f"train.run_dir={run_dir}", *TINY, *words]


def steps(run_dir: Path):
    """Logged steps; read while the run writes, so a last line still being written is not counted."""
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            break
    return rows


def start_and_wait_for_steps(dataset: Path, run_dir: Path, count: int, *overrides: str,
                             private_ray: bool = False) -> subprocess.Popen:
    """`python -m launch local` started, once it has logged `count` steps."""
    process = subprocess.Popen(launch("local", dataset, run_dir, *overrides, private_ray=private_ray), cwd=REPO,
                               env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while len(steps(run_dir)) < count:
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.3)
    return process


def test_sigterm_checkpoints_every_rank_and_the_next_launch_resumes(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    process = start_and_wait_for_steps(tiny_dataset, run_dir, STOP_AFTER, *LONGER)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    # Not a success, so a scheduler restarts it: the ranks exit 75, torchrun (signalled itself) reports 1.
    assert process.returncode == 1, output[-3000:]
    assert "exit status 75" in output, output[-6000:]
    stopped = re.search(rf"stopping at step (\d+) of {TOTAL} \(asked to stop \(SIGTERM\)\)", output)
    assert stopped, output[-3000:]
    step = int(stopped.group(1))
    assert STOP_AFTER <= step < TOTAL
    checkpoint = run_dir / "checkpoints" / f"step_{step}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    assert (checkpoint / "COMPLETE").exists() and len(list((checkpoint / "engine").glob("*optim_states.pt"))) == 2

    again = subprocess.run(launch("local", tiny_dataset, run_dir, *LONGER), cwd=REPO, env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming from {checkpoint} (step {step}" in again.stdout
    assert sorted(steps(run_dir)) == list(range(1, TOTAL + 1)) and len(set(steps(run_dir))) == TOTAL
    assert_exactly_once(run_dir)


def test_deepspeed_launcher_runs_the_same_entry(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    port = f"launcher.rdzv_port={free_port()}"
    done = subprocess.run(launch("deepspeed", tiny_dataset, run_dir, port), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "--no_local_rank --module train experiment=demo" in done.stdout
    assert "ZeRO-2 over 2 cpu process(es)" in done.stdout and "kino run finished" in done.stdout
    assert (run_dir / "checkpoints" / "step_8" / "COMPLETE").exists()


def every_process_of(pid: int):
    """The process tree under `pid`, and every process in a session one of them leads: the Ray head a run starts
    in a session of its own (data/ray_head.py) with its GCS, raylet and workers. What a preemption that signals
    every process of a job reaches."""
    rows = [line.split() for line in subprocess.run(["ps", "-eo", "pid=,ppid=,sid="], capture_output=True,
                                                    text=True).stdout.splitlines()]
    rows = [(int(p), int(pp), int(s)) for p, pp, s in rows]
    tree, frontier = {pid}, {pid}
    while frontier:
        frontier = {p for p, parent, _ in rows if parent in frontier} - tree
        tree |= frontier
    sessions = {sid for p, _, sid in rows if p in tree and sid == p}
    return tree | {p for p, _, sid in rows if sid in sessions}


def test_sigterm_to_every_process_ray_and_wandb_included_still_checkpoints_at_the_stop_step(tiny_dataset, tmp_path):
    """A plain scancel or a node preemption signals every process, the data coordinator's Ray cluster and W&B's
    service too. The trainer keeps the acknowledged data state itself, so the final checkpoint is complete at the
    stop step without the actor, and the next launch resumes from it with every step logged once."""
    run_dir = tmp_path / "run"
    process = start_and_wait_for_steps(tiny_dataset, run_dir, STOP_AFTER, *LONGER, "tracking.mode=offline",
                                       private_ray=True)
    targets = every_process_of(process.pid)
    assert len(targets) > 8  # launcher, torchrun, two ranks, Ray's head and its processes, W&B's service
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    output, _ = process.communicate(timeout=240)
    stopped = re.search(rf"stopping at step (\d+) of {TOTAL} \(asked to stop \(SIGTERM\)\)", output)
    assert stopped, output[-6000:]
    assert "rebuilt by the trainer (the coordinator is gone)" in output, output[-6000:]
    step = int(stopped.group(1))
    checkpoint = run_dir / "checkpoints" / f"step_{step}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    assert (checkpoint / "COMPLETE").exists()
    assert json.loads((checkpoint / "data_plan.json").read_text())["mirrored"] is True

    again = subprocess.run(launch("local", tiny_dataset, run_dir, *LONGER), cwd=REPO, env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming from {checkpoint} (step {step}" in again.stdout and "dealt out anew" in again.stdout
    assert sorted(steps(run_dir)) == list(range(1, TOTAL + 1)) and len(set(steps(run_dir))) == TOTAL
    assert_exactly_once(run_dir)

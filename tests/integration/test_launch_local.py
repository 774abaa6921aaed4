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

from tests.conftest import REPO, free_port
from tests.integration.test_training import TINY

ENV = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")


def launch(scheduler: str, dataset: Path, run_dir: Path, *overrides: str):
    return [sys.executable, "-m", "launch", scheduler, "experiment=demo", f"data.root={dataset}",
            f"train.run_dir={run_dir}", *TINY, *overrides]


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


def test_sigterm_checkpoints_every_rank_and_the_next_launch_resumes(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    longer = ("curriculum.stages.0.steps=40", "train.checkpoint_every=1000")
    process = subprocess.Popen(launch("local", tiny_dataset, run_dir, *longer), cwd=REPO, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while len(steps(run_dir)) < 10:
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    # Not a success, so a scheduler restarts it: the ranks exit 75, torchrun (signalled itself) reports 1.
    assert process.returncode == 1, output[-3000:]
    assert "exit status 75" in output, output[-6000:]
    stopped = re.search(r"stopping at step (\d+) of 43 \(asked to stop \(SIGTERM\)\)", output)
    assert stopped, output[-3000:]
    step = int(stopped.group(1))
    checkpoint = run_dir / "checkpoints" / f"step_{step}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    assert (checkpoint / "COMPLETE").exists() and len(list((checkpoint / "engine").glob("*optim_states.pt"))) == 2

    again = subprocess.run(launch("local", tiny_dataset, run_dir, *longer), cwd=REPO, env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming from {checkpoint} (step {step}" in again.stdout
    assert sorted(steps(run_dir)) == list(range(1, 44)) and len(set(steps(run_dir))) == 43


def test_deepspeed_launcher_runs_the_same_entry(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    port = f"launcher.rdzv_port={free_port()}"
    done = subprocess.run(launch("deepspeed", tiny_dataset, run_dir, port), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "--no_local_rank --module train experiment=demo" in done.stdout
    assert "ZeRO-2 over 2 cpu process(es)" in done.stdout and "kino run finished" in done.stdout
    assert (run_dir / "checkpoints" / "step_8" / "COMPLETE").exists()

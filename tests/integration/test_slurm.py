"""`python -m launch slurm` against a real SLURM cluster started on this machine (tests/integration/slurm_cluster.py):
munged + slurmctld + two slurmd nodes from Debian's packages, installed by the set-up when missing."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.exactly_once import assert_exactly_once
from tests.integration.slurm_cluster import LocalSlurmCluster, SlurmUnavailable
from tests.integration.test_training import TINY


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as reason:
        cluster.stop()
        pytest.skip(str(reason))
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


def submit(cluster, dataset: Path, run_dir: Path, *overrides: str) -> str:
    command = [sys.executable, "-m", "launch", "slurm", "experiment=demo", f"data.root={dataset}",
               f"train.run_dir={run_dir}", "launcher.nodes=2", "launcher.procs_per_node=1",
               f"launcher.rdzv_port={free_port()}", f"launcher.ray_port={free_port()}", *TINY, "tracking.mode=disabled",
               *overrides]
    env = dict(cluster.env, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = re.search(r"submitted SLURM job (\d+)", done.stdout).group(1)
    assert f"kino-demo-{job_id}.out" in done.stdout  # the log path is printed
    return job_id


def log_of(run_dir: Path, job_id: str) -> str:
    path = run_dir / "slurm" / f"kino-demo-{job_id}.out"
    return path.read_text() if path.exists() else ""


def logged_steps(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def test_demo_runs_on_two_slurm_nodes_with_ray_and_writes_a_complete_checkpoint(cluster, tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submit(cluster, tiny_dataset, run_dir)
    info = cluster.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
    log = log_of(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert "on n1 n2" in log and "node 0 of 2" in log and "node 1 of 2" in log
    assert "Ray head up" in log and "Ray worker up" in log
    assert "data coordinator: Ray actor" in log  # the coordinator lives on the job's Ray cluster
    assert "ZeRO-2 over 2 cpu process(es)" in log and "kino run finished" in log
    checkpoint = latest(run_dir)
    assert checkpoint.name == "step_8" and (checkpoint / "COMPLETE").exists()
    assert len(list((checkpoint / "engine").glob("zero_pp_rank_*_optim_states.pt"))) == 2  # one shard per node
    assert logged_steps(run_dir) == list(range(1, 9))
    assert_exactly_once(run_dir)


def test_time_limit_signal_checkpoints_requeues_and_the_requeued_job_resumes(cluster, tiny_dataset, tmp_path):
    """The real `#SBATCH --signal=B:USR1@55` of a 1-minute job: SLURM signals the batch shell (its
    time-limit check runs every ~30 s), every rank stops after the same step with a checkpoint, the
    job requeues itself, and the requeued job resumes from that checkpoint and finishes."""
    run_dir = tmp_path / "run"
    # slurmctld checks time limits every 30 s: the signal lands 5 to 35 s into the job, 0 to 20 s into training
    # (about 100 steps at the 2-core machine's 0.2 s a step). 240 steps leave the first attempt unfinished by then.
    total = 240
    job_id = submit(cluster, tiny_dataset, run_dir, "curriculum.stages.0.steps=220", "curriculum.stages.1.steps=20",
                    "train.checkpoint_every=1000", "launcher.time_limit=1", "launcher.slurm.preempt_signal_s=55")
    cluster.wait_for(job_id, {"PENDING"}, timeout=240, after_restarts=1)
    log = log_of(run_dir, job_id)
    assert "SIGUSR1 (time limit or preemption ahead)" in log, log[-3000:]
    # The next attempt gets time to finish, and skips SLURM's ~2 minute hold on requeued jobs, once
    # the nodes are idle (the hold exists so the old incarnation's clean-up ends first).
    cluster.wait_until_idle()
    cluster.update(job_id, "TimeLimit=10", "StartTime=now")
    info = cluster.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
    log = log_of(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]

    stopped = re.search(rf"stopping at step (\d+) of {total} \(asked to stop \(stop file", log)
    assert stopped, log[-4000:]
    step = int(stopped.group(1))
    assert 0 < step < total  # checkpoint_every=1000: this checkpoint exists only because of the signal
    assert "requeueing job" in log and "(restart 1)" in log
    assert f"resuming from {run_dir}/checkpoints/step_{step} (step {step}" in log
    assert latest(run_dir).name == f"step_{total}" and (latest(run_dir) / "COMPLETE").exists()
    steps = logged_steps(run_dir)
    assert sorted(steps) == list(range(1, total + 1)) and len(steps) == len(set(steps))  # no step lost or repeated
    assert not list(run_dir.glob(".stop-*"))
    assert_exactly_once(run_dir)


def test_scancel_signals_every_process_ray_included_and_the_next_job_resumes_from_the_stop_step(
        cluster, tiny_dataset, tmp_path):
    """A plain `scancel` (no --batch) sends SIGTERM to every process of the job: the ranks, the node agents and
    the Ray cluster that hosts the data coordinator. The final checkpoint still lands at the stop step (the trainer
    keeps the acknowledged data state itself), and the next job resumes from it with every step logged once."""
    import time

    run_dir = tmp_path / "run"
    total, stop_after = 20, 3
    steps = ("curriculum.stages.0.steps=17", "curriculum.stages.1.steps=3", "train.checkpoint_every=1000")
    job_id = submit(cluster, tiny_dataset, run_dir, *steps)
    deadline = time.monotonic() + 300
    while len(logged_steps(run_dir)) < stop_after:
        assert time.monotonic() < deadline, log_of(run_dir, job_id)[-3000:]
        time.sleep(0.3)
    subprocess.run(["scancel", job_id], env=cluster.env, check=True)
    info = cluster.wait_for(job_id, {"CANCELLED", "FAILED", "COMPLETED", "TIMEOUT"}, timeout=180)
    log = log_of(run_dir, job_id)
    assert info["JobState"] == "CANCELLED", log[-4000:]
    stopped = re.search(rf"stopping at step (\d+) of {total} \(asked to stop", log)
    assert stopped, log[-6000:]
    step = int(stopped.group(1))
    assert stop_after <= step < total
    assert "rebuilt by the trainer (the coordinator is gone)" in log  # Ray went down with the job's processes
    assert latest(run_dir).name == f"step_{step}" and (latest(run_dir) / "COMPLETE").exists()

    cluster.wait_until_idle()
    again = submit(cluster, tiny_dataset, run_dir, *steps)
    info = cluster.wait_for(again, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
    log = log_of(run_dir, again)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert f"resuming from {run_dir}/checkpoints/step_{step} (step {step}" in log
    done = logged_steps(run_dir)
    assert sorted(done) == list(range(1, total + 1)) and len(done) == len(set(done))
    assert_exactly_once(run_dir)

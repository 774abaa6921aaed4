"""`python -m launch slurm`: render an sbatch script, submit it, say where its logs go.

One task per node runs the node agent (launch/node.py): Ray head on the first node, Ray workers on the
others, and `torchrun --rdzv-backend c10d --rdzv-endpoint <first node>:<port> -m train ...` everywhere.

Preemption: SLURM sends SIGUSR1 to the batch shell `preempt_signal_s` before the time limit. The trap
creates the stop file every rank polls (train/preemption.py), waits for the checkpoint, then
`scontrol requeue`s the job; the requeued job resumes from `latest` in the same run directory.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import List

from launch.plan import LaunchError, LaunchPlan, python_on_nodes, shell_join, workdir

TEMPLATE = """#!/bin/bash
# {rendered}
{sbatch}
cd {workdir}
# launcher.slurm.setup (before `set -u`: module systems and activate scripts read unset variables)
{setup}
set -uo pipefail
{env}nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head_node=${{nodes[0]}}
head_addr=$(scontrol show node "$head_node" | grep -o 'NodeAddr=[^ ]*' | head -n 1 | cut -d= -f2)
head_addr=${{head_addr:-$head_node}}
# Every rank polls this file (train/preemption.py); one per job and restart, so no stale request survives.
mkdir -p {run_dir}
export KINO_STOP_FILE={run_dir}/.stop-$SLURM_JOB_ID-${{SLURM_RESTART_COUNT:-0}}
rm -f "$KINO_STOP_FILE"
echo "kino: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on ${{nodes[*]}}; head $head_node ($head_addr)"

train_pid=""
on_preemption_warning() {{
    echo "kino: SIGUSR1 (time limit or preemption ahead): every rank checkpoints after its step"
    touch "$KINO_STOP_FILE"
    local status=0
    if [ -n "$train_pid" ]; then wait "$train_pid"; status=$?; fi
    rm -f "$KINO_STOP_FILE"
    if [ "$(cat {run_dir}/checkpoints/latest 2>/dev/null)" = "step_{total_steps}" ]; then
        echo "kino: the run is finished; nothing to requeue"
        exit 0
    fi
    if [ "$status" -ne 0 ]; then
        echo "kino: training failed with status $status; not requeueing"
        exit "$status"
    fi
    echo "kino: checkpoint written; requeueing job $SLURM_JOB_ID"
    {requeue}
    exit 0
}}
trap on_preemption_warning USR1

# One task per node: the node agent starts Ray (head on the first node) and then
#   torchrun --nnodes={nodes} --nproc-per-node={procs} --rdzv-backend=c10d --rdzv-endpoint=$head_addr:{rdzv_port} -m train ...
# srun does not inherit --cpus-per-task from the allocation (Slurm >= 22.05): ask again.
srun --nodes={nodes} --ntasks-per-node=1 --cpus-per-task={cpus} --kill-on-bad-exit=1 {srun_extra}\\
    {python} -m launch.node --nodes={nodes} --procs={procs} --head="$head_addr" --node-rank-from=SLURM_NODEID \\
    --rdzv-port={rdzv_port} --ray-port={ray_port} --ray-cpus={ray_cpus} --ray-object-store-mb={object_store} \\
    --run-id="kino-$SLURM_JOB_ID" --stop-grace={grace} \\
    -- {overrides} &
train_pid=$!
wait "$train_pid"
status=$?
echo "kino: training exited with status $status"
rm -f "$KINO_STOP_FILE"
exit $status
"""


def sbatch_options(plan: LaunchPlan, log_dir: Path) -> List[str]:
    launcher, slurm = plan.cfg.launcher, plan.cfg.launcher.slurm
    options = [f"--job-name={slurm.job_name or plan.name}", f"--nodes={plan.nodes}", "--ntasks-per-node=1",
               f"--cpus-per-task={launcher.cpus_per_node}", f"--time={launcher.time_limit}",
               f"--output={log_dir}/%x-%j.out", "--open-mode=append"]
    if launcher.gpus_per_node:
        options.append(f"--gpus-per-node={launcher.gpus_per_node}")
    if launcher.memory is not None:
        options.append(f"--mem={launcher.memory}")
    for key in ("partition", "account", "qos"):
        if getattr(slurm, key):
            options.append(f"--{key}={getattr(slurm, key)}")
    if slurm.preempt_signal_s:
        options.append(f"--signal=B:USR1@{slurm.preempt_signal_s}")
    options.append("--requeue" if slurm.requeue else "--no-requeue")
    return options + list(slurm.extra_sbatch)


def render(plan: LaunchPlan, script_path: Path, log_dir: Path, dry_run: bool = False) -> str:
    launcher, slurm = plan.cfg.launcher, plan.cfg.launcher.slurm
    srun_extra = ""
    if slurm.container_image:
        srun_extra = (f"--container-image={shlex.quote(slurm.container_image)} "
                      f"--container-workdir={shlex.quote(workdir(plan.cfg))} ")
        if slurm.container_mounts:
            srun_extra += f"--container-mounts={shlex.quote(slurm.container_mounts)} "
    env = "".join(f"export {key}={shlex.quote(str(value))}\n" for key, value in sorted(launcher.env.items()))
    requeue = 'scontrol requeue "$SLURM_JOB_ID"' if slurm.requeue else 'echo "kino: launcher.slurm.requeue=false"'
    python = "python" if slurm.container_image else python_on_nodes(plan.cfg)
    return TEMPLATE.format(
        rendered=(f"Rendered by `python -m launch slurm --dry-run` on {time.strftime('%Y-%m-%d %H:%M:%S')}: not written "
                  f"or submitted; without --dry-run it is written to {script_path} and submitted" if dry_run else
                  f"Rendered by `python -m launch slurm` on {time.strftime('%Y-%m-%d %H:%M:%S')}. Submit again "
                  f"with: sbatch {script_path}"),
        sbatch="\n".join(f"#SBATCH {option}" for option in sbatch_options(plan, log_dir)),
        workdir=shlex.quote(workdir(plan.cfg)), setup="\n".join(slurm.setup), env=env,
        run_dir=shlex.quote(str(Path(workdir(plan.cfg)) / plan.run_dir)), requeue=requeue,
        total_steps=plan.cfg.total_steps, nodes=plan.nodes, procs=plan.procs_per_node, cpus=launcher.cpus_per_node,
        srun_extra=srun_extra, python=shlex.quote(python),
        rdzv_port=launcher.rdzv_port, ray_port=launcher.ray_port, ray_cpus=max(1, launcher.cpus_per_node // 8),
        object_store=launcher.ray_object_store_mb, grace=max(30, slurm.preempt_signal_s - 10),
        overrides=shell_join(plan.overrides))


def paths(plan: LaunchPlan):
    base = Path(workdir(plan.cfg)) / plan.run_dir
    log_dir = Path(plan.cfg.launcher.slurm.log_dir or base / "slurm")
    if not log_dir.is_absolute():
        log_dir = Path(workdir(plan.cfg)) / log_dir
    return base / "slurm" / f"{plan.name}.sbatch", log_dir


def run(plan: LaunchPlan, dry_run: bool) -> int:
    script_path, log_dir = paths(plan)
    script = render(plan, script_path, log_dir, dry_run)
    if dry_run:
        print(script)
        return 0
    if not _which("sbatch"):
        raise LaunchError("sbatch not found: run this on a SLURM login node (or --dry-run to see the script)")
    log_dir.mkdir(parents=True, exist_ok=True)  # SLURM opens the log before the script runs
    script_path.parent.mkdir(parents=True, exist_ok=True)
    script_path.write_text(script)
    done = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise LaunchError(f"sbatch refused the job: {done.stderr.strip()} (script: {script_path})")
    job_id = done.stdout.strip().split(";")[0]
    name = plan.cfg.launcher.slurm.job_name or plan.name
    print(f"submitted SLURM job {job_id}")
    print(f"  script : {script_path}")
    print(f"  log    : {log_dir}/{name}-{job_id}.out   (tail -f it; requeued runs append to it)")
    print(f"  run dir: {Path(workdir(plan.cfg)) / plan.run_dir}")
    print(f"  stop   : scancel {job_id}   (or scancel --batch --signal=USR1 {job_id} to checkpoint and requeue)")
    return 0


def _which(tool: str) -> bool:
    return any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep))

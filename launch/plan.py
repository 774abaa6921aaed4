"""What every launch path shares: resolve and check the config, then the one training command.

A plan is made on the machine that launches, before anything is submitted: a config that cannot run,
or a model that cannot fit, is refused here and costs no queue time.
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from conf.errors import UserError
from conf.schema import ConfigError, KinoConfig, load_config


class LaunchError(UserError, ValueError):
    """A launch that cannot work; the message says which setting to change."""


@dataclass
class LaunchPlan:
    cfg: KinoConfig
    overrides: List[str]  # the user's Hydra overrides, passed unchanged to `-m train` on every node
    scheduler: str
    memory_report: str = "memory check: skipped"
    notes: List[str] = field(default_factory=list)

    @property
    def nodes(self) -> int:
        return self.cfg.launcher.nodes

    @property
    def procs_per_node(self) -> int:
        return self.cfg.launcher.processes_per_node()

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def name(self) -> str:
        """A name schedulers accept (DNS-1035 label: Kubernetes is the strictest)."""
        raw = f"kino-{self.cfg.train.experiment}"
        return re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")[:45].rstrip("-")

    @property
    def run_dir(self) -> str:
        return self.cfg.run_dir

    def train_command(self) -> List[str]:
        """`-m train` and the overrides: the same entry on every path."""
        return ["-m", "train", *self.overrides]

    def describe(self) -> str:
        launcher = self.cfg.launcher
        gpus = f", {launcher.gpus_per_node} GPU(s) per node" if launcher.gpus_per_node else ", no GPUs"
        return (f"kino launch ({self.scheduler}): experiment {self.cfg.train.experiment!r}, {self.nodes} node(s) x "
                f"{self.procs_per_node} process(es) = {self.world_size} rank(s){gpus}; {self.cfg.total_steps} steps "
                f"in {len(self.cfg.curriculum.stages)} stage(s); run dir {self.run_dir}\n{self.memory_report}"
                + "".join(f"\nnote: {note}" for note in self.notes))


def make_plan(scheduler: str, overrides: List[str], dry_run: bool = False) -> LaunchPlan:
    try:
        cfg = load_config(overrides)
    except ConfigError as error:
        raise LaunchError(str(error)) from error
    plan = LaunchPlan(cfg, list(overrides), scheduler)
    launcher = cfg.launcher
    if scheduler == "local" and launcher.nodes != 1:
        raise LaunchError(f"launcher.nodes={launcher.nodes}: `launch local` runs on this machine only; "
                          "use `launch slurm`, `launch k8s` or `launch deepspeed` for several nodes")
    if scheduler in ("slurm", "k8s") and not cfg.train.resume:
        raise LaunchError("train.resume=false: a scheduler restarts preempted jobs, and every restart would start "
                          "the run over; pick a new train.run_dir instead (the old one is kept)")
    if scheduler == "local" and launcher.procs_per_node is None:
        launcher.gpus_per_node = _visible_gpus()  # this machine's GPUs, not a cluster profile's
    if scheduler == "deepspeed" and launcher.hostfile:
        from launch.hostfile import read_hostfile

        launcher.nodes = len(read_hostfile(launcher.hostfile))  # DeepSpeed starts on every host listed
    plan.memory_report = check_memory(cfg, plan.world_size)
    check_tracking_login(plan, dry_run)
    return plan


def check_tracking_login(plan: LaunchPlan, dry_run: bool) -> None:
    """tracking.mode=online: the ranks log in with what the launching shell has (its environment, ~/.netrc on a
    shared home), so a missing login is refused here, before anything starts. Kubernetes pods read the key from
    the Secret launcher.k8s.wandb_secret instead, which only the cluster can check."""
    if plan.scheduler == "k8s":
        return
    from train.tracking import wandb_credentials_problem

    problem = wandb_credentials_problem(plan.cfg.tracking)
    if problem and dry_run:
        plan.notes.append(problem)
    elif problem:
        raise LaunchError(problem)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_memory(cfg: KinoConfig, world_size: int) -> str:
    """The per-GPU estimate of train.memory against the GPU kind in launcher.gpu_type; raises if it cannot fit."""
    launcher = cfg.launcher
    if launcher.gpus_per_node == 0 or launcher.gpu_type is None:
        return "memory check: skipped (no GPUs requested or launcher.gpu_type=null)"
    from train.memory import GPU_MEMORY_GIB, estimate

    if launcher.gpu_type not in GPU_MEMORY_GIB:
        raise LaunchError(f"launcher.gpu_type={launcher.gpu_type!r}: known kinds {sorted(GPU_MEMORY_GIB)} "
                          "(or null to skip the memory check)")
    capacity = GPU_MEMORY_GIB[launcher.gpu_type] * 2 ** 30
    result = estimate(cfg, world_size)
    gib = result.peak / 2 ** 30
    line = (f"memory check: ~{gib:.1f} GiB per GPU of {GPU_MEMORY_GIB[launcher.gpu_type]} GiB "
            f"({launcher.gpu_type}, ZeRO-{cfg.zero.stage} over {world_size} ranks; train.memory)")
    if not result.fits(capacity):
        raise LaunchError(f"{line}: does not fit {result.advice()}; `python -m train.memory` shows the parts "
                          "(launcher.gpu_type=null skips this check)")
    return line + ": fits"


def python_on_nodes(cfg: KinoConfig) -> str:
    return cfg.launcher.python or sys.executable


def workdir(cfg: KinoConfig) -> str:
    return str(Path(cfg.launcher.workdir or Path.cwd()).resolve())


def shell_join(words: List[str]) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)

"""Typed `launcher` section of the config tree: where and on how much hardware a run starts.

Only `python -m launch` reads it; the trainer ignores it, and changing it never changes a run's
trajectory, so a run can move between local, SLURM and Kubernetes and resume the same run directory.
Cluster profiles go in conf/launcher/<name>.yaml and are picked with `launcher=<name>`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from conf.errors import ConfigError

# launcher.env is written into job scripts and manifests: names like these must come another way.
SECRET_LIKE = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL")


@dataclass
class SlurmConfig:
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    job_name: Optional[str] = None  # default kino-<experiment>
    # Shell lines run at the top of the batch script, e.g. "module load cuda/12.4",
    # "source /shared/kino/.venv/bin/activate".
    setup: List[str] = field(default_factory=list)
    # pyxis/enroot container for the training step (srun --container-image); null = the host environment.
    container_image: Optional[str] = None
    container_mounts: Optional[str] = None  # srun --container-mounts, e.g. "/lustre:/lustre"
    # SLURM signals the batch script this many seconds before the time limit (--signal=B:USR1@N):
    # every rank checkpoints after its current step, then the job requeues itself and resumes from `latest`.
    preempt_signal_s: int = 300
    requeue: bool = True
    extra_sbatch: List[str] = field(default_factory=list)  # more options, e.g. "--exclusive", "--constraint=h100"
    log_dir: Optional[str] = None  # default RUN/slurm


@dataclass
class K8sConfig:
    api: str = "jobset"  # jobset (primary) | pytorchjob (Kubeflow Training Operator v1)
    namespace: str = "default"
    name: Optional[str] = None  # default kino-<experiment>; a DNS-1035 label
    image: Optional[str] = None  # a container image with Kino installed (required to render)
    image_pull_policy: str = "IfNotPresent"
    # A ReadWriteMany PersistentVolumeClaim holding the run directory and the data; mounted at mount_path,
    # which is also the working directory (relative paths such as datasets/ and runs/ resolve inside it).
    volume_claim: Optional[str] = None
    mount_path: str = "/workspace"
    gpu_resource: str = "nvidia.com/gpu"
    shm_size: str = "64Gi"  # /dev/shm for NCCL and data workers
    # W&B API key: read from this Secret into WANDB_API_KEY when tracking.mode=online. The key's value
    # is never written into a manifest or printed.
    wandb_secret: str = "wandb"
    wandb_secret_key: str = "api-key"
    # Object-storage credentials (s3:// data): every key of this Secret becomes an environment variable of the
    # pods (envFrom), e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL. null: none (a pod role).
    storage_secret: Optional[str] = None
    max_restarts: int = 20  # whole-job restarts (each resumes from `latest`)
    termination_grace_s: int = 600  # time to checkpoint after SIGTERM (eviction, preemption)
    service_account: Optional[str] = None
    node_selector: Dict[str, str] = field(default_factory=dict)
    priority_class: Optional[str] = None


@dataclass
class LauncherConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    procs_per_node: Optional[int] = None  # torchrun processes per node; null = gpus_per_node (1 without GPUs)
    cpus_per_node: int = 32
    memory: Optional[str] = None  # per node: SLURM --mem (e.g. "500G"), Kubernetes memory request ("500Gi")
    time_limit: str = "24:00:00"  # SLURM --time
    # Memory check before launch (train.memory): the GPU kind, a key of train.memory.GPU_MEMORY_GIB;
    # null skips the check.
    gpu_type: Optional[str] = "H100"
    rdzv_port: int = 29500  # torchrun c10d rendezvous on the first node
    ray_port: int = 6379  # Ray head (the data coordinator's cluster) on the first node
    ray_object_store_mb: int = 1024
    python: Optional[str] = None  # interpreter on the nodes; null = the one running `python -m launch`
    workdir: Optional[str] = None  # directory the run starts in; null = the current directory
    env: Dict[str, str] = field(default_factory=dict)  # extra environment (never secrets)
    hostfile: Optional[str] = None  # `python -m launch deepspeed`: an SSH hostfile ("host slots=N" lines)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)

    def processes_per_node(self) -> int:
        if self.procs_per_node is not None:
            return self.procs_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    def check(self) -> None:
        if self.nodes < 1 or self.processes_per_node() < 1 or self.gpus_per_node < 0:
            raise ConfigError("launcher.nodes and launcher.procs_per_node must be >= 1, launcher.gpus_per_node >= 0")
        if self.gpus_per_node and self.processes_per_node() > self.gpus_per_node:
            raise ConfigError(f"launcher.procs_per_node={self.procs_per_node} is more than "
                              f"launcher.gpus_per_node={self.gpus_per_node}: one process drives one GPU")
        if self.k8s.api not in ("jobset", "pytorchjob"):
            raise ConfigError(f"launcher.k8s.api={self.k8s.api!r}: must be jobset or pytorchjob")
        secret_like = [k for k in self.env if SECRET_LIKE.search(k.upper())]
        if secret_like:
            raise ConfigError(f"launcher.env.{secret_like[0]}: launcher.env is written into job scripts and "
                              "manifests; pass secrets through the submitting shell's environment (SLURM) or a "
                              "Kubernetes Secret (launcher.k8s.wandb_secret)")
        if self.slurm.preempt_signal_s < 0:
            raise ConfigError("launcher.slurm.preempt_signal_s must be >= 0 (0 = no preemption signal)")

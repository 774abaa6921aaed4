"""Distributed set-up and the DeepSpeed engine, configured from the Hydra tree."""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from conf.schema import KinoConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# glibc's mallopt parameter: allocations from this size up are mapped on their own, and unmapped when freed.
M_MMAP_THRESHOLD = -3
ZERO12_BUCKET = 50_000_000  # zero.reduce_bucket_size's null under ZeRO-0/1/2 (elements)
HOST_MMAP_THRESHOLD = 256 * 1024


def release_freed_host_memory() -> bool:
    """Fix glibc's mmap threshold at 256 KiB, so that a freed host tensor of that size or more goes back to the OS.
    By default glibc raises the threshold to the largest block freed so far (up to 32 MiB), and from then on such
    tensors come from its heap, which keeps what is freed: in a 0.28B model on 2 CPU ranks, each rank's resident
    memory grew about 2.5 GB over its first steps in freed weights, gradients and optimizer temporaries. Fixed at
    4 MiB, the heap still held about 300 MiB a rank that ZeRO-3's partitions (a 1024 x 1024 weight is 2 MiB a rank
    on 2 ranks) and its gathered blocks fragment between steps: 256 KiB takes about 250 MiB off that run's peak, at
    no measurable cost in step time (benchmarks/start_memory.py). Returns False where the C library has no mallopt
    (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def init_distributed() -> DistEnv:
    """One process group for torchrun, SLURM (srun + torchrun) and Kubernetes alike: nccl on GPU, gloo on CPU."""
    release_freed_host_memory()
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
        # A plain `python -m train` is a world of one and agrees on its port with no one: a free port, so two
        # such runs on one machine never collide over a fixed default.
        from data.ray_head import free_local_port

        os.environ["MASTER_PORT"] = str(free_local_port())
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if not use_cuda:
        # The CPU shared-memory collective op compiles for a minute on first use; gloo alone serves CPU runs.
        compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
        if isinstance(compatible, dict):
            compatible["deepspeed_shm_comm"] = False
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)


def cpu_threads(cfg: KinoConfig, env: DistEnv) -> Optional[int]:
    """Set torch's intra-op threads for a CPU run (train.cpu_threads); the count set, or None when left as it is
    (a GPU run, or OMP_NUM_THREADS given). torch's own default, every core, leaves nothing for the data
    coordinator, decode workers and the OS: on a busy machine its threads wait on each other at every op."""
    if env.device.type != "cpu":
        return None
    threads = cfg.train.cpu_threads
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        threads = max(1, per_process - 1 - cfg.data.num_workers)
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def local_cores_for_main_rank(env: DistEnv):
    """While the main rank evaluates or makes videos alone, the node's other ranks wait at the next collective, and
    on a CPU run their threads' cores would idle: for that time the main rank runs the threads of every rank of its
    node (its own count, from train.cpu_threads or torchrun's OMP_NUM_THREADS, times LOCAL_WORLD_SIZE)."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if env.device.type != "cpu" or ranks < 2:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(before * ranks)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def deepspeed_config(cfg: KinoConfig, world_size: int, device_type: str, load_universal: bool = False) -> Dict[str, Any]:
    zero, optim = cfg.zero, cfg.optim
    zero_section: Dict[str, Any] = {
        "stage": zero.stage,
        "overlap_comm": zero.overlap_comm,
        "contiguous_gradients": True,
    }
    reduce_bucket, prefetch_bucket = bucket_sizes(cfg)
    zero_section["reduce_bucket_size"] = reduce_bucket
    if zero.stage in (1, 2):
        zero_section["allgather_bucket_size"] = zero.allgather_bucket_size
    if zero.stage == 3:
        live = zero.max_live_parameters or two_blocks(cfg)
        zero_section.update(stage3_max_live_parameters=live,
                            stage3_max_reuse_distance=live if zero.max_reuse_distance is None else zero.max_reuse_distance,
                            stage3_prefetch_bucket_size=prefetch_bucket, sub_group_size=zero.sub_group_size)
    if zero.offload_optimizer:
        zero_section["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if zero.offload_parameters:
        zero_section["offload_param"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    return {
        # Micro-batches are packed by tokens, not counted in samples: DeepSpeed sees one "sample" each.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": zero.gradient_accumulation_steps,
        "train_batch_size": zero.gradient_accumulation_steps * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero_section,
        # The overflow check is what skips a step with a non-finite micro-batch (train/trainer.py): keep it on.
        "bf16": {"enabled": zero.precision == "bf16", "check_grad_overflow": True},
        # bf16 gradients are summed in fp32: across micro-batches (gradient accumulation) and across ranks (the
        # reduce-scatter / all-reduce). A bf16 sum of many terms drops their tail (8 bits of mantissa).
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": "fp32",
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.curriculum.stages[0].lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                # torch's AdamW on every device: DeepSpeed's own Adam ops (FusedAdam, CPUAdam) are JIT-built
                # at run time (about a minute, a CUDA toolkit on every node, and a crash on arch lists such
                # as "9.0a"). On CUDA torch's fused kernel is as fast; the optimizer state format is one.
                "torch_adam": True,
                "fused": device_type == "cuda" and not zero.offload_optimizer,
            },
        },
        "zero_force_ds_cpu_optimizer": False,
        # A checkpoint written by another number of ranks loads through DeepSpeed's universal format.
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def bucket_sizes(cfg: KinoConfig) -> Tuple[int, int]:
    """zero.reduce_bucket_size and zero.prefetch_bucket_size, in elements, null resolved. Under ZeRO-3, null sizes
    them by the model's width, as DeepSpeed's Hugging Face integration does for "auto": model.dim^2 for the reduce
    bucket and 0.9 x model.dim^2 for the prefetch, about one square weight each (26M elements for a 5,120-wide
    14B). DeepSpeed's fixed 5e7 is 200 MiB of fp32 a rank in each, whatever the model: on 2 CPU ranks of a 0.28B
    model that is a third of the headroom the issue's bar leaves. ZeRO-0/1/2 keep 5e7 for the reduce bucket."""
    zero = cfg.zero
    if zero.stage == 3:
        square = cfg.model.dim ** 2
        return zero.reduce_bucket_size or square, zero.prefetch_bucket_size or max(1, int(0.9 * square))
    return zero.reduce_bucket_size or ZERO12_BUCKET, zero.prefetch_bucket_size or ZERO12_BUCKET


def two_blocks(cfg: KinoConfig) -> int:
    """Twice the parameters of one of the DiT's blocks (its parameters / model.depth, counted on the meta device):
    zero.max_live_parameters' default."""
    from train.methods import build_model

    with torch.device("meta"):
        if cfg.train.method == "dit":  # sized from the config alone, where the encoder's files need not be
            from models.dit import TextToVideoModel, planned_context_dim

            model = TextToVideoModel(cfg.model, context=planned_context_dim(cfg.model))
        else:
            model = build_model(cfg)
    return max(1, 2 * sum(p.numel() for p in model.parameters()) // max(1, cfg.model.depth))


def compute_dtype(cfg: KinoConfig) -> torch.dtype:
    """The dtype the trained model computes in (DeepSpeed converts its parameters; the EMA stays fp32)."""
    return torch.bfloat16 if cfg.zero.precision == "bf16" else torch.float32


def build_engine(model: torch.nn.Module, cfg: KinoConfig, env: DistEnv, load_universal: bool = False):
    import deepspeed

    config = deepspeed_config(cfg, env.world_size, env.device.type, load_universal)
    # Only what trains enters the optimizer (LoRA freezes the base weights).
    trainable = [p for p in model.parameters() if p.requires_grad]
    with fp32_master_shared():
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    return engine


@contextlib.contextmanager
def fp32_master_shared():
    """While DeepSpeed builds a ZeRO-3 optimizer: where the module's partition is already fp32 on the optimizer's
    device (an fp32 run), the optimizer's fp32 master partition is that same tensor, not a clone of it.

    DeepSpeed means to share it (stage3.py `_create_fp32_partitions`), but compares the tensor's `torch.device`
    with its device name, a string, which is never equal, so every fp32 ZeRO-3 run kept a second fp32 copy of
    its partition: 4 bytes a parameter per rank, 534 MiB a rank for a 0.28B model on 2 ranks. After a step
    DeepSpeed copies the master into the module's partition, which is then a copy onto itself."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    create = Stage3._create_fp32_partitions

    def create_shared(optimizer):
        create(optimizer)
        if optimizer.offload_optimizer:
            return
        masters = optimizer.fp32_partitioned_groups_flat
        for i, (master, partition) in enumerate(zip(masters, optimizer.fp16_partitioned_groups_flat)):
            if (master is not partition and master.dtype == partition.dtype and master.device == partition.device
                    and master.numel() == partition.numel() and master not in optimizer.optimizer.state
                    and not optimizer._swappable_optimizer_subgroup(i)):
                partition.ds_id = master.ds_id
                partition.requires_grad = True
                masters[i] = partition

    Stage3._create_fp32_partitions = create_shared
    try:
        yield
    finally:
        Stage3._create_fp32_partitions = create


def set_learning_rate(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def full_parameters(module: torch.nn.Module):
    """A context in which every parameter of `module` is whole on every rank. Under ZeRO-3 this gathers
    the partitions (collective: every rank must enter it); otherwise parameters are already whole."""
    return gathered(list(module.parameters()))


def gathered(params):
    """full_parameters for a list of parameters: gather what ZeRO-3 partitioned (collective), else nothing."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def global_grad_norm(engine) -> Optional[float]:
    """The last step's gradient norm, None where DeepSpeed has none or it is not finite."""
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    if norm is None:
        return None
    norm = float(norm)
    return norm if math.isfinite(norm) else None


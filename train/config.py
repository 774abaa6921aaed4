"""The typed configuration tree and its validation.

Every knob of a run is a field here; YAML files under conf/ only choose values.
Validation runs before any process group starts, so a bad config costs nothing.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from data.config import DataConfig
from launch.config import LauncherConfig
from models.config import ModelConfig


@dataclass
class StageConfig:
    name: str = "stage"
    steps: int = 100
    # Bucket shapes: each resolution is the side of a square of equal area.
    resolutions: List[int] = field(default_factory=lambda: [32])
    aspect_ratios: List[float] = field(default_factory=lambda: [1.0])  # width / height
    frame_counts: List[int] = field(default_factory=lambda: [8])
    # Video tokens per GPU micro-batch (after patchify); samples are packed up to it.
    token_budget: int = 2048
    # Share of samples trained as single frames (images), each drawn from its clip: the image/video mix.
    image_fraction: float = 0.0
    lr: float = 3e-4
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.1


@dataclass
class CurriculumConfig:
    name: str = "demo"
    stages: List[StageConfig] = field(default_factory=lambda: [StageConfig()])


@dataclass
class OptimConfig:
    name: str = "adamw"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class ZeroConfig:
    stage: int = 2
    precision: str = "fp32"  # fp32 | bf16
    gradient_accumulation_steps: int = 1
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    offload_optimizer: bool = False
    # ZeRO-3 only: keep the parameter partitions in CPU memory between uses.
    offload_parameters: bool = False


@dataclass
class TrackingConfig:
    # offline (default: no account needed) | online | disabled
    mode: str = "offline"
    project: str = "kino"
    entity: Optional[str] = None
    log_every: int = 10
    # Sample videos from fixed prompts every N steps (0: only at the end of the run).
    sample_every: int = 0
    sample_prompts: List[str] = field(default_factory=lambda: ["a red circle moving right on a black background"])
    # Evaluation (train/evaluate.py) every N steps with the EMA weights, and at the end; 0 = only at the end.
    eval_every: int = 0
    # Procedural prompts judged per split (seen in training / held out); 0 = no adherence evaluation.
    eval_prompts: int = 0
    # Clips of data.validation_root for the validation loss; 0 = none.
    eval_clips: int = 0
    sample_steps: int = 20
    sampler: str = "euler"  # euler | heun
    cfg_scale: float = 3.0
    # Peak FLOP/s of one device for MFU; null = look it up from the device name (unknown on CPU).
    peak_flops: Optional[float] = None


@dataclass
class TrainConfig:
    experiment: str = "default"
    # dit: the text-to-video diffusion transformer; vae: the built-in causal video VAE (experiment=vae_demo)
    method: str = "dit"
    run_dir: Optional[str] = None  # default runs/<experiment>
    seed: int = 0
    resume: bool = True
    checkpoint_every: int = 100
    keep_last: int = 3
    ema_decay: float = 0.999
    # Write every trained sample key per step to RUN/provenance/ (the license audit trail).
    record_sample_keys: bool = True
    max_nonfinite_in_row: int = 5
    # Stop (with a checkpoint) after this many steps in this invocation; null = run to the end.
    # For jobs with a wall-clock limit: the next invocation resumes from `latest`.
    stop_after_steps: Optional[int] = None
    # Flow matching: logit-normal timesteps and a resolution-dependent shift.
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    shift_reference_tokens: int = 256


@dataclass
class KinoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.curriculum.stages)

    @property
    def run_dir(self) -> str:
        return self.train.run_dir or f"runs/{self.train.experiment}"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


def _register() -> None:
    ConfigStore.instance().store(name="kino_schema", node=KinoConfig)


def load_config(overrides: List[str], check: bool = True) -> KinoConfig:
    """Compose conf/config.yaml with command-line overrides into a KinoConfig, validated unless check=False
    (for tools that read one section only, e.g. `python -m models`)."""
    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="conf", version_base="1.3"):
            composed = compose(config_name="config", overrides=list(overrides))
    except Exception as error:  # Hydra/OmegaConf name the offending key in their message.
        raise ConfigError(f"invalid configuration: {error}") from error
    cfg: KinoConfig = OmegaConf.to_object(composed)
    if check:
        validate(cfg)
    return cfg


def to_yaml(cfg: KinoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> KinoConfig:
    merged = OmegaConf.merge(OmegaConf.structured(KinoConfig), OmegaConf.create(text))
    return OmegaConf.to_object(merged)


def flatten(cfg: KinoConfig) -> Dict[str, Any]:
    """Dotted key -> value, the form used for config hashes and resume checks."""
    flat: Dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        elif isinstance(node, list) and any(isinstance(item, dict) for item in node):
            for index, item in enumerate(node):
                walk(f"{prefix}.{index}", item)
        else:
            flat[prefix] = node

    walk("", OmegaConf.to_container(OmegaConf.structured(cfg)))
    return flat


# Keys a resumed run may change: they affect bookkeeping, not the training trajectory.
RESUMABLE_KEYS = (
    "train.resume", "train.checkpoint_every", "train.keep_last", "train.run_dir",
    "train.record_sample_keys", "train.stop_after_steps", "tracking", "data.num_workers", "data.root",
    "data.coordinator", "data.ray_address", "data.validation_root", "data.lease_timeout_s",
    "model.attention_backend", "model.activation_checkpointing", "launcher",
)


def is_resumable_key(key: str) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in RESUMABLE_KEYS)


def trajectory_hash(cfg: KinoConfig) -> str:
    """Hash of every key that shapes training; equal hashes mean a resume is exact."""
    relevant = {k: v for k, v in flatten(cfg).items() if not is_resumable_key(k)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_trajectory_keys(saved: KinoConfig, current: KinoConfig) -> List[str]:
    old, new = flatten(saved), flatten(current)
    keys = sorted(set(old) | set(new))
    return [k for k in keys if not is_resumable_key(k) and old.get(k) != new.get(k)]


def validate(cfg: KinoConfig) -> None:
    """Reject configurations that cannot run, naming the key at fault."""
    model = cfg.model
    if len(model.patch_size) != 3 or min(model.patch_size) < 1:
        raise ConfigError(f"model.patch_size must be three positive ints (p_t, p_h, p_w), got {model.patch_size}")
    if model.dim % model.heads:
        raise ConfigError(f"model.dim={model.dim} is not divisible by model.heads={model.heads}")
    if (model.dim // model.heads) % 2:
        raise ConfigError("model.dim / model.heads must be even for rotary embeddings")
    if model.text.dim % model.text.heads:
        raise ConfigError(f"model.text.dim={model.text.dim} is not divisible by model.text.heads={model.text.heads}")
    if model.conditioning not in ("cross_attention", "joint"):
        raise ConfigError(f"model.conditioning={model.conditioning!r}: supported: cross_attention, joint")
    if model.text.name not in ("builtin", "pretrained"):
        raise ConfigError(f"model.text.name={model.text.name!r}: supported: builtin, pretrained")
    if model.position_embedding not in ("fractional", "none"):
        raise ConfigError(f"model.position_embedding={model.position_embedding!r}: supported: fractional, none")
    if model.text.tokenizer not in ("bytes", "words"):
        raise ConfigError(f"model.text.tokenizer={model.text.tokenizer!r}: supported: bytes, words")
    if model.text.tokenizer == "words" and model.text.vocab_size < 16:
        raise ConfigError(f"model.text.vocab_size={model.text.vocab_size}: too small for hashed words")
    if model.text.name == "pretrained" and not model.text.path:
        raise ConfigError("model.text.path must name a local T5/UMT5 directory when model.text.name=pretrained")
    if model.autoencoder.name not in ("pixel", "causal_vae", "diffusers"):
        raise ConfigError(f"model.autoencoder.name={model.autoencoder.name!r}: supported: pixel, causal_vae, diffusers")
    if model.attention_backend not in ("auto", "flash_attn", "torch_varlen", "sdpa", "reference"):
        raise ConfigError(f"model.attention_backend={model.attention_backend!r} is not a known backend")
    if cfg.zero.stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero.stage={cfg.zero.stage}: must be 0, 1, 2 or 3")
    if cfg.zero.offload_parameters and cfg.zero.stage != 3:
        raise ConfigError(f"zero.offload_parameters needs zero.stage=3 (got {cfg.zero.stage})")
    if cfg.zero.precision not in ("fp32", "bf16"):
        raise ConfigError(f"zero.precision={cfg.zero.precision!r}: must be fp32 or bf16")
    if cfg.tracking.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"tracking.mode={cfg.tracking.mode!r}: must be offline, online or disabled")
    if cfg.train.method not in ("dit", "vae"):
        raise ConfigError(f"train.method={cfg.train.method!r}: must be dit or vae")
    if cfg.train.method == "vae" and cfg.model.autoencoder.name != "causal_vae":
        raise ConfigError("train.method=vae trains the built-in VAE: set model.autoencoder.name=causal_vae")
    if cfg.tracking.sampler not in ("euler", "heun"):
        raise ConfigError(f"tracking.sampler={cfg.tracking.sampler!r}: must be euler or heun")
    for key in ("eval_every", "eval_prompts", "eval_clips"):
        if getattr(cfg.tracking, key) < 0:
            raise ConfigError(f"tracking.{key}={getattr(cfg.tracking, key)}: must be >= 0")
    if cfg.tracking.eval_clips and not cfg.data.validation_root:
        raise ConfigError("tracking.eval_clips needs data.validation_root (a held-out split)")
    if not cfg.curriculum.stages:
        raise ConfigError("curriculum.stages is empty")
    if cfg.data.coordinator not in ("auto", "local", "ray"):
        raise ConfigError(f"data.coordinator={cfg.data.coordinator!r}: must be auto, local or ray")
    if cfg.data.coordinator == "local" and cfg.data.num_workers > 0:
        raise ConfigError("data.num_workers > 0 needs data.coordinator=ray (workers are separate processes)")
    if cfg.data.lease_timeout_s <= 0:
        raise ConfigError(f"data.lease_timeout_s={cfg.data.lease_timeout_s}: must be > 0 seconds")
    if not 0 <= cfg.data.pack_tolerance < 1 or cfg.data.pack_window < 1:
        raise ConfigError("data.pack_window must be >= 1 and data.pack_tolerance in [0, 1)")
    if not cfg.data.licenses.allow:
        raise ConfigError("data.licenses.allow is empty: no sample could ever be trained on")
    _validate_stages(cfg)
    _validate_launcher(cfg)


def _validate_launcher(cfg: KinoConfig) -> None:
    launcher = cfg.launcher
    if launcher.nodes < 1 or launcher.processes_per_node() < 1 or launcher.gpus_per_node < 0:
        raise ConfigError("launcher.nodes and launcher.procs_per_node must be >= 1, launcher.gpus_per_node >= 0")
    if launcher.gpus_per_node and launcher.processes_per_node() > launcher.gpus_per_node:
        raise ConfigError(f"launcher.procs_per_node={launcher.procs_per_node} is more than "
                          f"launcher.gpus_per_node={launcher.gpus_per_node}: one process drives one GPU")
    if launcher.k8s.api not in ("jobset", "pytorchjob"):
        raise ConfigError(f"launcher.k8s.api={launcher.k8s.api!r}: must be jobset or pytorchjob")
    secret_like = [k for k in launcher.env if re.search(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", k.upper())]
    if secret_like:
        raise ConfigError(f"launcher.env.{secret_like[0]}: launcher.env is written into job scripts and manifests; "
                          "pass secrets through the submitting shell's environment (SLURM) or a Kubernetes "
                          "Secret (launcher.k8s.wandb_secret)")
    if launcher.slurm.preempt_signal_s < 0:
        raise ConfigError("launcher.slurm.preempt_signal_s must be >= 0 (0 = no preemption signal)")


def _validate_stages(cfg: KinoConfig) -> None:
    from data.buckets import bucket_shapes  # local import: data depends on nothing in train

    pt, ph, pw = cfg.model.patch_size
    ae = cfg.model.autoencoder
    names = set()
    for i, stage in enumerate(cfg.curriculum.stages):
        key = f"curriculum.stages[{i}]"
        if stage.name in names:
            raise ConfigError(f"{key}.name={stage.name!r} is used by two stages")
        names.add(stage.name)
        if stage.steps <= 0:
            raise ConfigError(f"{key}.steps must be positive")
        if not 0.0 <= stage.image_fraction <= 1.0:
            raise ConfigError(f"{key}.image_fraction={stage.image_fraction} must be in [0, 1]")
        if (stage.image_fraction > 0 or 1 in stage.frame_counts) and pt != 1:
            raise ConfigError(f"{key}: images (1-frame buckets, image_fraction) need model.patch_size[0] = 1")
        if stage.schedule not in ("constant", "cosine"):
            raise ConfigError(f"{key}.schedule={stage.schedule!r}: must be constant or cosine")
        for frames in stage.frame_counts:
            if ae.temporal_factor > 1 and (frames - 1) % ae.temporal_factor:
                raise ConfigError(f"{key}.frame_counts: {frames} frames; a causal autoencoder with temporal factor "
                                  f"{ae.temporal_factor} needs 1 + {ae.temporal_factor}k frames")
            latent_frames = 1 + (frames - 1) // ae.temporal_factor if ae.temporal_factor > 1 else frames
            if frames < 1 or latent_frames % pt:
                raise ConfigError(f"{key}.frame_counts: {frames} frames do not divide into temporal patches of {pt}")
        multiple = ae.spatial_factor * max(ph, pw)
        for side in stage.resolutions:
            if side <= 0 or side % multiple:
                raise ConfigError(f"{key}.resolutions: {side} is not a positive multiple of {multiple} "
                                  f"(patch size {cfg.model.patch_size} x autoencoder factor {ae.spatial_factor})")
        if not stage.aspect_ratios or min(stage.aspect_ratios) <= 0:
            raise ConfigError(f"{key}.aspect_ratios must be positive width/height ratios")
        shapes = bucket_shapes(stage.resolutions, stage.aspect_ratios, stage.frame_counts, multiple=multiple)
        smallest = min(s.tokens(cfg.model.patch_size, ae.temporal_factor, ae.spatial_factor) for s in shapes)
        largest = max(s.tokens(cfg.model.patch_size, ae.temporal_factor, ae.spatial_factor) for s in shapes)
        if stage.token_budget < smallest:
            raise ConfigError(
                f"{key}.token_budget={stage.token_budget} is smaller than the smallest sample ({smallest} tokens)")
        if stage.token_budget < largest:
            raise ConfigError(
                f"{key}.token_budget={stage.token_budget} cannot hold the largest bucket ({largest} tokens)")

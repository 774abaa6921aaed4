"""The typed configuration tree: one section per part, each defined (and checked) beside its code.

    model      models/config.py      ModelConfig.check()
    data       data/config.py        DataConfig.check()
    curriculum, optim, zero, tracking, train
               train/config.py       each section's check()
    launcher   launch/config.py      LauncherConfig.check()

YAML files under conf/ only choose values; every knob is a field of a section. `validate` runs every section's
check, then the checks that span sections, before any process group starts, so a bad config costs nothing.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conf.errors import ConfigError
from conf.keys import check_override_keys
from data.config import DataConfig
from launch.config import LauncherConfig
from models.config import ModelConfig
from train.config import CurriculumConfig, OptimConfig, ParallelConfig, TrackingConfig, TrainConfig, ZeroConfig

__all__ = ["ConfigError", "KinoConfig", "load_config", "validate", "to_yaml", "from_yaml", "flatten",
           "trajectory_hash", "changed_trajectory_keys", "is_resumable_key"]


@dataclass
class KinoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.curriculum.stages)

    @property
    def run_dir(self) -> str:
        return self.train.run_dir or f"runs/{self.train.experiment}"


def validate(cfg: KinoConfig, world_size: Optional[int] = None) -> None:
    """Reject configurations that cannot run, naming the key at fault. `world_size`: the processes this run has
    (torchrun's WORLD_SIZE in `python -m train`); None = the launcher section's nodes x processes per node."""
    cfg.model.check()
    cfg.data.check()
    cfg.optim.check()
    cfg.zero.check()
    cfg.parallel.check()
    cfg.tracking.check()
    cfg.train.check()
    cfg.curriculum.check(cfg.model)  # bucket shapes must fit the model's patches and autoencoder
    cfg.launcher.check()
    # Checks across sections.
    if cfg.train.method == "vae" and cfg.model.autoencoder.name != "causal_vae":
        raise ConfigError("train.method=vae trains the built-in VAE: set model.autoencoder.name=causal_vae")
    if cfg.train.method == "vae" and not cfg.data.validation_root:
        raise ConfigError("train.method=vae needs data.validation_root: its samples reconstruct held-out clips")
    if cfg.train.method != "dit" and (cfg.model.mlp_chunks > 1 or cfg.model.loss_chunks > 1):
        raise ConfigError(f"model.mlp_chunks and model.loss_chunks tile the DiT; train.method={cfg.train.method} "
                          f"has none (set them to 1)")
    check_base_model(cfg)
    check_frame_inputs(cfg)
    conditioned = [k for k in ("conditioned_timestep_mean", "conditioned_timestep_std")
                   if getattr(cfg.train, k) is not None]
    if conditioned and not cfg.model.frame_conditioning:
        raise ConfigError(f"train.{conditioned[0]} sets the timesteps of clips given frames: "
                          "set model.frame_conditioning=true, or leave it null")
    if cfg.train.method == "dit":
        cfg.model.check_lora_targets()
    if world_size is None:
        world_size = cfg.launcher.nodes * cfg.launcher.processes_per_node()
    check_sequence_parallel(cfg, world_size)
    if cfg.tracking.eval_clips and not cfg.data.validation_root:
        raise ConfigError("tracking.eval_clips needs data.validation_root (a held-out split)")


def check_sequence_parallel(cfg: KinoConfig, world_size: int) -> None:
    """parallel.ulysses x parallel.ring against the model and the world size (the launcher's, or torchrun's at
    start-up)."""
    degree, ulysses, ring = cfg.parallel.sequence, cfg.parallel.ulysses, cfg.parallel.ring
    if degree == 1:
        return
    name = f"parallel.sequence={degree}" if ring == 1 else f"parallel.ulysses={ulysses} x parallel.ring={ring}"
    if cfg.train.method != "dit":
        raise ConfigError(f"{name}: sequence parallelism splits the DiT; "
                          f"train.method={cfg.train.method} trains without it (set parallel.sequence=1)")
    if cfg.model.heads % ulysses:
        what = f"parallel.sequence={degree}" if ring == 1 else f"parallel.ulysses={ulysses}"
        raise ConfigError(f"{what} does not divide model.heads={cfg.model.heads}: Ulysses gives each rank of a "
                          f"group whole heads. Take a Ulysses degree that divides the heads and the rest as ring "
                          f"attention (parallel.ulysses=U parallel.ring=R, N = U x R: docs/scaling.md)")
    if ring > 1 and cfg.model.arch != "wan" and cfg.model.conditioning == "joint":
        raise ConfigError(f"{name} with model.conditioning=joint: ring attention over a joint caption-and-video "
                          f"sequence is not built; use Ulysses alone (parallel.sequence) or cross-attention")
    if world_size % degree:
        raise ConfigError(f"{name} ({degree} ranks) does not divide the world size {world_size} "
                          f"(launcher.nodes x processes per node): every rank belongs to one group of {degree}")


def check_base_model(cfg: KinoConfig) -> None:
    """model.init_from: its license allowed (its files are checked where the run starts: train/preflight.py)."""
    model = cfg.model
    if model.init_from and model.init_license not in cfg.data.licenses.allow_weights:
        raise ConfigError(f"model.init_license={model.init_license!r} is not in data.licenses.allow_weights="
                          f"{list(cfg.data.licenses.allow_weights)}: these base weights may not be trained from")


def check_frame_inputs(cfg: KinoConfig) -> None:
    """model.image.inputs=pipeline against the stages trained from a latent cache: the cache keeps the conditions of
    a given first frame, last frame or both (models/conditioning.py cached_conditions), not those of every stretch an
    extension mode draws."""
    if not cfg.model.pipeline_inputs:
        return
    for i, stage in enumerate(cfg.curriculum.stages):
        extending = [m for m in ("extend", "extend_backward") if float(stage.conditioning.get(m, 0.0)) > 0]
        cache = stage.latents or cfg.data.latents
        if extending and cache:
            raise ConfigError(f"curriculum.stages[{i}].conditioning trains {', '.join(extending)} from the latent "
                              f"cache {cache}: with model.image.inputs=pipeline a clip given a stretch of frames "
                              f"reads the encoding of that stretch followed by grey frames, which a cache does not "
                              f"hold for every stretch; train this stage from the videos (with data.latents unset, "
                              f"giving the other stages their cache in curriculum.stages[j].latents), or set "
                              f"model.image.inputs=kino")


def _register() -> None:
    ConfigStore.instance().store(name="kino_schema", node=KinoConfig)


def load_config(overrides: List[str], check: bool = True, world_size: Optional[int] = None) -> KinoConfig:
    """Compose conf/config.yaml with command-line overrides into a KinoConfig, validated unless check=False
    (for tools that read one section only, e.g. `python -m models`)."""
    check_override_keys(list(overrides), KinoConfig)
    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="conf", version_base="1.3"):
            composed = compose(config_name="config", overrides=list(overrides))
    except Exception as error:  # Hydra/OmegaConf name the offending key in their message
        raise ConfigError(f"invalid configuration: {hydra_reason(error)}") from error
    cfg: KinoConfig = OmegaConf.to_object(composed)
    if check:
        validate(cfg, world_size)
    return cfg


def hydra_reason(error: BaseException) -> str:
    """Hydra's message in one line, with the reason it keeps in the chained error ("Error merging override
    curriculum.stages.0.steps=abc" says which override, its cause why: the value is not an int)."""
    lines = [str(error).strip().splitlines()[0]]
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause).strip():
        reason = str(cause).strip().splitlines()[0]
        if reason not in lines[0]:
            lines.append(reason)
    # Unknown schema keys never get here (conf/keys.py): Hydra's "use +key=value" is then about a mapping
    # (launcher.env), where adding the key is what the user wants.
    hint = [line.strip() for line in str(error).splitlines() if line.strip().startswith("To append")]
    return ": ".join(lines).rstrip(".") + (f" ({hint[0]})" if hint else "")


def to_yaml(cfg: KinoConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# Keys renamed since a checkpoint may have been written: (section, old name, new name).
RENAMED_KEYS = [("tracking", "sample_every", "video_every"), ("tracking", "sample_prompts", "video_prompts"),
                ("tracking", "sample_steps", "sampling_steps")]


def from_yaml(text: str) -> KinoConfig:
    """A saved config (config.yaml of a run or checkpoint), written by this or an earlier version."""
    saved = OmegaConf.create(text)
    for section, old, new in RENAMED_KEYS:
        node = saved.get(section)
        if node is not None and old in node:
            node[new] = node.pop(old)
    merged = OmegaConf.merge(OmegaConf.structured(KinoConfig), saved)
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
    "train.record_sample_keys", "train.stop_after_steps", "train.cpu_threads", "tracking", "data.num_workers", "data.root",
    "data.coordinator", "data.ray_address", "data.validation_root", "data.latents", "data.lease_timeout_s", "data.allow_changed_dataset",
    "model.attention_backend", "model.activation_checkpointing", "model.compile", "model.compile_backend", "model.mlp_chunks",
    "model.loss_chunks", "model.init_sha256", "parallel", "launcher",
)


def is_resumable_key(key: str) -> bool:
    if key.startswith("curriculum.stages.") and key.endswith(".latents"):
        # A stage may move between its videos and a cache of them on resume: a cache holds the same samples at the
        # same places (checked before start), so the data plan goes on.
        return True
    return any(key == prefix or key.startswith(prefix + ".") for prefix in RESUMABLE_KEYS)


def trajectory_hash(cfg: KinoConfig) -> str:
    """Hash of every key that shapes training; equal hashes mean a resume is exact."""
    relevant = {k: v for k, v in flatten(cfg).items() if not is_resumable_key(k)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_trajectory_keys(saved: KinoConfig, current: KinoConfig) -> List[str]:
    old, new = flatten(saved), flatten(current)
    keys = sorted(set(old) | set(new))
    return [k for k in keys if not is_resumable_key(k) and old.get(k) != new.get(k)]

"""Typed sections of the training run (curriculum, optim, zero, tracking, train) and their checks.

conf/schema.py assembles them with the model, data and launcher sections into the whole tree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from conf.errors import ConfigError

# What a run can train: the keys of train/methods.py's registry (which checks it), named here so that reading a
# config imports no trainer.
METHOD_NAMES = ("dit", "vae")


def frame_count_problem(frames: int, model) -> Optional[str]:
    """Why a clip of `frames` frames cannot go through the model's autoencoder and temporal patches (None: it can)."""
    pt, ae = model.patch_size[0], model.autoencoder
    if frames < 1:
        return f"{frames} frames: a clip has at least 1"
    if ae.temporal_factor > 1 and (frames - 1) % ae.temporal_factor:
        return (f"{frames} frames; a causal autoencoder with temporal factor {ae.temporal_factor} needs "
                f"1 + {ae.temporal_factor}k frames")
    latent_frames = 1 + (frames - 1) // ae.temporal_factor if ae.temporal_factor > 1 else frames
    if latent_frames % pt:
        return f"{frames} frames do not divide into temporal patches of {pt}"
    return None


def spatial_multiple(model) -> int:
    """What every frame side must be a multiple of: the patch size times the autoencoder's spatial factor."""
    return model.autoencoder.spatial_factor * max(model.patch_size[1], model.patch_size[2])


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
    # The share of clips trained in each conditioning mode (models/conditioning.py MODES): text (text-to-video),
    # first_frame (image-to-video), last_frame, first_last, extend, extend_backward; the given frames come from the
    # clip itself. Shares sum to 1; anything but text needs model.frame_conditioning.
    conditioning: Dict[str, float] = field(default_factory=lambda: {"text": 1.0})
    # A latent cache of this stage's buckets (`python -m data encode --stage NAME`) to train it from, instead of
    # decoding and encoding the videos; null = data.latents, or the videos (data.root) when that is null too.
    latents: Optional[str] = None
    lr: float = 3e-4
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.1

    def check(self, key: str, model) -> None:
        """`model`: the model section, whose patches and autoencoder every bucket must divide into."""
        from data.buckets import bucket_shapes

        pt, ph, pw = model.patch_size
        ae = model.autoencoder
        if self.steps <= 0:
            raise ConfigError(f"{key}.steps must be positive")
        if not 0.0 <= self.image_fraction <= 1.0:
            raise ConfigError(f"{key}.image_fraction={self.image_fraction} must be in [0, 1]")
        if (self.image_fraction > 0 or 1 in self.frame_counts) and pt != 1:
            raise ConfigError(f"{key}: images (1-frame buckets, image_fraction) need model.patch_size[0] = 1")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"{key}.schedule={self.schedule!r}: must be constant or cosine")
        from models.conditioning import check_shares

        try:
            shares = check_shares(dict(self.conditioning), f"{key}.conditioning")
        except ValueError as problem:
            raise ConfigError(str(problem)) from None
        if any(v > 0 for m, v in shares.items() if m != "text") and not model.frame_conditioning:
            raise ConfigError(f"{key}.conditioning gives frames ({', '.join(m for m, v in shares.items() if v > 0)}): "
                              "set model.frame_conditioning=true")
        for frames in self.frame_counts:
            problem = frame_count_problem(frames, model)
            if problem:
                raise ConfigError(f"{key}.frame_counts: {problem}")
        multiple = spatial_multiple(model)
        for side in self.resolutions:
            if side <= 0 or side % multiple:
                raise ConfigError(f"{key}.resolutions: {side} is not a positive multiple of {multiple} "
                                  f"(patch size {model.patch_size} x autoencoder factor {ae.spatial_factor})")
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise ConfigError(f"{key}.aspect_ratios must be positive width/height ratios")
        shapes = bucket_shapes(self.resolutions, self.aspect_ratios, self.frame_counts, multiple=multiple)
        tokens = [s.tokens(model.patch_size, ae.temporal_factor, ae.spatial_factor) for s in shapes]
        if self.token_budget < min(tokens):
            raise ConfigError(
                f"{key}.token_budget={self.token_budget} is smaller than the smallest sample ({min(tokens)} tokens)")
        if self.token_budget < max(tokens):
            raise ConfigError(
                f"{key}.token_budget={self.token_budget} cannot hold the largest bucket ({max(tokens)} tokens)")


@dataclass
class CurriculumConfig:
    name: str = "demo"
    stages: List[StageConfig] = field(default_factory=lambda: [StageConfig()])

    def check(self, model) -> None:
        if not self.stages:
            raise ConfigError("curriculum.stages is empty")
        names = set()
        for i, stage in enumerate(self.stages):
            key = f"curriculum.stages[{i}]"
            if stage.name in names:
                raise ConfigError(f"{key}.name={stage.name!r} is used by two stages")
            names.add(stage.name)
            stage.check(key, model)


@dataclass
class OptimConfig:
    name: str = "adamw"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def check(self) -> None:
        if self.name != "adamw":
            raise ConfigError(f"optim.name={self.name!r}: supported: adamw")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)}: must be two values in [0, 1)")
        if self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.eps must be > 0, optim.weight_decay and optim.grad_clip >= 0")


@dataclass
class ZeroConfig:
    stage: int = 2
    precision: str = "fp32"  # fp32 | bf16
    gradient_accumulation_steps: int = 1
    overlap_comm: bool = False
    # Elements; null: model.dim^2 under ZeRO-3 (about one square weight, as DeepSpeed's "auto" sizes it), 5e7 under
    # ZeRO-0/1/2 (train/engine.py bucket_sizes).
    reduce_bucket_size: Optional[int] = None
    allgather_bucket_size: int = 50_000_000
    # ZeRO-3 only: how many gathered parameters (elements) may be whole on a rank at once, and how soon a parameter
    # is to be used again for it to stay whole (elements); null: two repeated blocks' parameters, so the model is
    # never whole on a rank (DeepSpeed's own default, 1e9, keeps every model below 1B parameters whole from its
    # forward to its backward). prefetch_bucket_size: how many elements are gathered ahead of use; null: 0.9 x
    # model.dim^2.
    max_live_parameters: Optional[int] = None
    max_reuse_distance: Optional[int] = None
    prefetch_bucket_size: Optional[int] = None
    # ZeRO-3 only: the optimizer steps over this many elements of a rank's partition at a time; an unfused Adam's
    # temporaries (the CPU's) are a few times this size, not a few times the partition's.
    sub_group_size: int = 20_000_000
    offload_optimizer: bool = False
    # ZeRO-3 only: keep the parameter partitions in CPU memory between uses.
    offload_parameters: bool = False

    def check(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero.stage={self.stage}: must be 0, 1, 2 or 3")
        if self.offload_parameters and self.stage != 3:
            raise ConfigError(f"zero.offload_parameters needs zero.stage=3 (got {self.stage})")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"zero.precision={self.precision!r}: must be fp32 or bf16")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError(f"zero.gradient_accumulation_steps={self.gradient_accumulation_steps}: must be >= 1")
        for key in ("reduce_bucket_size", "allgather_bucket_size", "max_live_parameters", "prefetch_bucket_size",
                    "sub_group_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"zero.{key}={getattr(self, key)}: must be >= 1")
        if self.max_reuse_distance is not None and self.max_reuse_distance < 0:
            raise ConfigError(f"zero.max_reuse_distance={self.max_reuse_distance}: must be >= 0")


@dataclass
class ParallelConfig:
    # Sequence (context) parallelism (train/sequence_parallel.py, docs/scaling.md): groups of N = ulysses x ring
    # consecutive ranks share each micro-batch, each computing a stretch of its tokens. Ulysses trades tokens for
    # heads by all-to-all (its degree divides model.heads); ring attention passes keys and values around a ring
    # (train/ring_attention.py; any degree). N divides the world size; data parallelism runs over the world / N
    # groups, and a stage's token_budget is then a group's.
    # `sequence`: N. Alone (the configs from before the ring), it is Ulysses' degree: parallel.sequence=4 is
    # parallel.ulysses=4. With `ring` it may be left out or must equal ulysses x ring.
    sequence: int = 1
    ulysses: Optional[int] = None  # None: sequence / ring (1 when sequence is left at 1)
    ring: int = 1

    def check(self) -> None:
        for key in ("sequence", "ring") + (("ulysses",) if self.ulysses is not None else ()):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}={getattr(self, key)}: must be >= 1")
        if self.ulysses is None:
            if self.sequence != 1 and self.sequence % self.ring:
                raise ConfigError(f"parallel.sequence={self.sequence} is not a multiple of parallel.ring={self.ring}: "
                                  f"the degree is ulysses x ring")
            self.ulysses = max(1, self.sequence // self.ring)
        degree = self.ulysses * self.ring
        if self.sequence not in (1, degree):
            raise ConfigError(f"parallel.sequence={self.sequence} is not parallel.ulysses x parallel.ring = "
                              f"{self.ulysses} x {self.ring}: leave parallel.sequence out, or make them agree")
        self.sequence = degree  # what every reader of the degree takes: the group's size


@dataclass
class TrackingConfig:
    # offline (default: no account needed) | online | disabled
    mode: str = "offline"
    project: str = "kino"
    entity: Optional[str] = None
    log_every: int = 10
    # Generate videos from fixed prompts every N steps (0: only at the end of the run) into RUN/videos/step_N;
    # video_prompts=[]: no videos, not even at the end.
    video_every: int = 0
    video_prompts: List[str] = field(default_factory=lambda: ["a red circle moving right on a black background"])
    # Evaluation (train/evaluate.py) every N steps with the EMA weights, and at the end; 0 = only at the end.
    eval_every: int = 0
    # Procedural prompts judged per split (seen in training / held out); 0 = no adherence evaluation.
    eval_prompts: int = 0
    # Clips of data.validation_root for the validation loss; 0 = none.
    eval_clips: int = 0
    sampling_steps: int = 20
    sampler: str = "euler"  # euler | heun
    cfg_scale: float = 3.0
    # Guidance for extension windows (half their frames given): the given frames already fix where the object is
    # and how fast it goes, and guidance past 1 pulls toward where the caption's clips usually have it: the demo's
    # model drew a second object there (continuous extensions 7/16 seen prompts at 3.0, 13/16 at 1.0).
    extend_cfg_scale: float = 1.0
    # Peak FLOP/s of one device for MFU; null = look it up from the device name (unknown on CPU).
    peak_flops: Optional[float] = None

    def check(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"tracking.mode={self.mode!r}: must be offline, online or disabled")
        if self.sampler not in ("euler", "heun"):
            raise ConfigError(f"tracking.sampler={self.sampler!r}: must be euler or heun")
        for key in ("cfg_scale", "extend_cfg_scale"):
            if getattr(self, key) < 0:
                raise ConfigError(f"tracking.{key}={getattr(self, key)}: must be >= 0 (1 = no guidance)")
        if self.log_every < 1:
            raise ConfigError(f"tracking.log_every={self.log_every}: must be >= 1")
        for key in ("eval_every", "eval_prompts", "eval_clips", "video_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"tracking.{key}={getattr(self, key)}: must be >= 0")
        if self.video_every and not self.video_prompts:
            raise ConfigError(f"tracking.video_every={self.video_every} asks for videos, and tracking.video_prompts is "
                              f"empty: give prompts, or set tracking.video_every=0 (no videos)")


@dataclass
class TrainConfig:
    experiment: str = "default"
    # What is trained (train/methods.py): dit, the text-to-video diffusion transformer; vae, the built-in
    # causal video VAE (experiment=vae_demo)
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
    # CPU runs: torch's intra-op threads per process. null = OMP_NUM_THREADS when set (torchrun sets 1 for several
    # processes), else the cores this process may use, less one and one per data worker (train/engine.py
    # cpu_threads: two compute threads on a 2-core machine with one core taken fell from 3.7k to 1.7k tok/s).
    cpu_threads: Optional[int] = None
    # Stop (with a checkpoint) after this many steps in this invocation; null = run to the end.
    # For jobs with a wall-clock limit: the next invocation resumes from `latest`.
    stop_after_steps: Optional[int] = None
    # Flow matching: logit-normal timesteps and a resolution-dependent shift.
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    # The logit-normal mean and std of the clips trained with given frames (model.frame_conditioning); null = the
    # text clips' (timestep_mean, timestep_std). Higher or wider trains them more at the high noise where only the
    # given frames place what is generated (models/conditioning.py conditioned_timesteps).
    conditioned_timestep_mean: Optional[float] = None
    conditioned_timestep_std: Optional[float] = None
    shift_reference_tokens: int = 256

    def check(self) -> None:
        if self.method not in METHOD_NAMES:
            raise ConfigError(f"train.method={self.method!r}: must be {' or '.join(METHOD_NAMES)}")
        if self.keep_last < 1:
            raise ConfigError(f"train.keep_last={self.keep_last}: must be >= 1")
        if self.checkpoint_every < 0:
            raise ConfigError(f"train.checkpoint_every={self.checkpoint_every}: must be >= 0")
        for key in ("timestep_std", "conditioned_timestep_std"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"train.{key}={value}: must be > 0")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"train.cpu_threads={self.cpu_threads}: must be >= 1 (or null for the default)")

"""Typed data configuration (Hydra structured config, group `data`) and its checks."""
from dataclasses import dataclass, field
from typing import List, Optional

from conf.errors import ConfigError


@dataclass
class LicensePolicyConfig:
    # Only samples whose `license` is in this list ever reach the model.
    allow: List[str] = field(default_factory=lambda: ["CC0-1.0"])
    # Licenses a base model's weights (model.init_from, declared by model.init_license) may carry.
    allow_weights: List[str] = field(default_factory=lambda: ["Apache-2.0", "MIT", "CC0-1.0"])


@dataclass
class DataConfig:
    name: str = "demo"
    # Directory holding the shards and their manifest.json.
    root: str = "datasets/demo"
    licenses: LicensePolicyConfig = field(default_factory=LicensePolicyConfig)
    # Resume onto a dataset whose shards changed since the checkpoint (a takedown, a rebuild): the epoch is then
    # re-planned over the current shards. Without it such a resume is refused.
    allow_changed_dataset: bool = False
    # Frames are sampled at this rate before fitting a clip to its bucket.
    fps: float = 8.0
    # Video decoder (data/decode.py): decord (the default), pyav, or torchcodec where it loads. Same frames and
    # crops from each; a decoder that does not load here is rejected before a run starts.
    decoder: str = "decord"
    # Train from a latent cache built by `python -m data encode` (data/latent_cache.py) instead of decoding and
    # encoding clips each step: its directory. Every stage's buckets and the frozen encoders' identity must be
    # the cache's (checked before a run starts). data.root stays the source dataset.
    latents: Optional[str] = None
    # Probability of replacing a caption by the empty (unconditional) caption, for CFG.
    caption_dropout: float = 0.1
    # DataLoader worker processes per rank that decode video (> 0 needs the Ray coordinator).
    num_workers: int = 0
    seed: int = 0
    # Who hands out shards: local (in-process, one process, no workers), ray (a Ray actor every rank and
    # worker reaches), auto (ray when there are several ranks or workers).
    coordinator: str = "auto"
    # An existing Ray cluster (e.g. started by the launcher on the first node); null = start one on rank 0.
    ray_address: Optional[str] = None
    # Samples per unit of work handed out; null = a whole shard.
    chunk_samples: Optional[int] = None
    # A consumer (rank x loader worker) whose batches have not trained for this long is taken for dead and its
    # unfinished chunks are dealt to others. Longer than the slowest step (plus a checkpoint) times the
    # batches a worker prefetches.
    lease_timeout_s: float = 600.0
    # A consumer done with its share of an epoch takes the last chunks of the slowest ones before a new epoch opens
    # (data/coordinator.py): epochs stay in step however unevenly ranks read. Which consumer takes which chunk then
    # depends on timing, so two runs (or a run and its resume) no longer read the same data in the same order;
    # off, the deal alone decides it and fast ranks may run epochs ahead (docs/data.md).
    work_stealing: bool = False
    # Epochs in lockstep over the whole run: no rank trains a sample of epoch e+1 while any sample of epoch e is
    # still untrained anywhere, so every sample's training count stays within one of every other's at every step.
    # A batch never mixes epochs, and a rank whose next batch belongs to a newer epoch than the oldest one any rank
    # still trains runs it with a zero loss weight (its collectives stay in step) and trains it later
    # (train/data_plane.py). Off: epochs overlap freely and drift apart (docs/data.md).
    strict_epochs: bool = True
    # A held-out licensed split (shards + manifest.json) for the validation loss; null = none.
    validation_root: Optional[str] = None
    # Packing: clips buffered to choose from, and the unused fraction of the token budget accepted.
    pack_window: int = 16
    pack_tolerance: float = 0.01

    def check(self) -> None:
        from data.decode import decoder_unavailable

        why = decoder_unavailable(self.decoder)
        if why:
            raise ConfigError(f"data.decoder={self.decoder!r} cannot decode here: {why}")
        if self.coordinator not in ("auto", "local", "ray"):
            raise ConfigError(f"data.coordinator={self.coordinator!r}: must be auto, local or ray")
        if self.coordinator == "local" and self.num_workers > 0:
            raise ConfigError("data.num_workers > 0 needs data.coordinator=ray (workers are separate processes)")
        if self.lease_timeout_s <= 0:
            raise ConfigError(f"data.lease_timeout_s={self.lease_timeout_s}: must be > 0 seconds")
        if not 0 <= self.pack_tolerance < 1 or self.pack_window < 1:
            raise ConfigError("data.pack_window must be >= 1 and data.pack_tolerance in [0, 1)")
        if not self.licenses.allow:
            raise ConfigError("data.licenses.allow is empty: no sample could ever be trained on")

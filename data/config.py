"""Typed data configuration (Hydra structured config, group `data`)."""
from dataclasses import dataclass, field
from typing import List


@dataclass
class LicensePolicyConfig:
    # Only samples whose `license` is in this list ever reach the model.
    allow: List[str] = field(default_factory=lambda: ["CC0-1.0"])


@dataclass
class DataConfig:
    name: str = "demo"
    # Directory holding the shards and their manifest.json.
    root: str = "datasets/demo"
    licenses: LicensePolicyConfig = field(default_factory=LicensePolicyConfig)
    # Frames are sampled at this rate before fitting a clip to its bucket.
    fps: float = 8.0
    # Probability of replacing a caption by the empty (unconditional) caption, for CFG.
    caption_dropout: float = 0.1
    # DataLoader worker processes per rank that decode video.
    num_workers: int = 0
    seed: int = 0

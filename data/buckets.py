"""Curriculum buckets and token-budget packing.

A bucket is one (frames, height, width) shape. Each clip goes to the bucket nearest
its aspect ratio among the longest frame counts it can fill; micro-batches are
packed with clips of mixed shapes up to a token budget (the model attends within
each clip only, so mixing costs nothing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence


@dataclass(frozen=True, order=True)
class BucketShape:
    frames: int
    height: int
    width: int

    @property
    def aspect_ratio(self) -> float:
        return self.width / self.height

    def latent_shape(self, temporal_factor: int = 1, spatial_factor: int = 1) -> tuple:
        # Causal autoencoders encode the first frame alone: T -> 1 + (T - 1) / factor.
        frames = self.frames if temporal_factor == 1 else 1 + (self.frames - 1) // temporal_factor
        return frames, self.height // spatial_factor, self.width // spatial_factor

    def tokens(self, patch_size: Sequence[int], temporal_factor: int = 1, spatial_factor: int = 1) -> int:
        t, h, w = self.latent_shape(temporal_factor, spatial_factor)
        return (t // patch_size[0]) * (h // patch_size[1]) * (w // patch_size[2])


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def bucket_shapes(resolutions: Sequence[int], aspect_ratios: Sequence[float], frame_counts: Sequence[int],
                  multiple: int) -> List[BucketShape]:
    """All shapes of a stage: each resolution keeps its area (side²) across aspect ratios."""
    shapes = set()
    for side in resolutions:
        for ratio in aspect_ratios:
            height = _round_to(side / math.sqrt(ratio), multiple)
            width = _round_to(side * math.sqrt(ratio), multiple)
            for frames in frame_counts:
                shapes.add(BucketShape(frames, height, width))
    return sorted(shapes)


def assign_bucket(shapes: Sequence[BucketShape], width: int, height: int, available_frames: int,
                  rng_choice: Optional[float] = None) -> Optional[BucketShape]:
    """The bucket for a clip: longest frame count it can fill, then nearest aspect ratio,
    then the resolution closest to (not above) the clip's own; None if it fits no bucket."""
    fitting = [s for s in shapes if s.frames <= available_frames]
    if not fitting:
        return None
    frames = max(s.frames for s in fitting)
    candidates = [s for s in fitting if s.frames == frames]
    log_ratio = math.log(width / height)
    best_ratio = min(abs(math.log(s.aspect_ratio) - log_ratio) for s in candidates)
    candidates = [s for s in candidates if abs(abs(math.log(s.aspect_ratio) - log_ratio) - best_ratio) < 1e-9]
    # Prefer the largest bucket the clip can fill without upsampling; else the smallest.
    not_upsampled = [s for s in candidates if s.height <= height and s.width <= width]
    if not_upsampled:
        return max(not_upsampled, key=lambda s: s.height * s.width)
    return min(candidates, key=lambda s: s.height * s.width)


class GreedyPacker:
    """Packs items into micro-batches in arrival order without exceeding a token budget.

    Order is kept so a data cursor stays a single position: everything before the
    first item of the open batch has been emitted.
    """

    def __init__(self, token_budget: int):
        self.token_budget = token_budget
        self.items: list = []
        self.tokens = 0

    def add(self, item, tokens: int) -> List[list]:
        """Add an item; returns the batches it closed (none, one, or two when it fills the next)."""
        if tokens > self.token_budget:
            raise ValueError(f"a sample of {tokens} tokens exceeds the token budget {self.token_budget}")
        closed = []
        if self.tokens + tokens > self.token_budget:
            closed.append(self.flush())
        self.items.append(item)
        self.tokens += tokens
        if self.tokens == self.token_budget:
            closed.append(self.flush())
        return closed

    def flush(self) -> list:
        batch, self.items, self.tokens = self.items, [], 0
        return batch

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


class WindowPacker:
    """Packs items into micro-batches of at most `token_budget` tokens, choosing from a window of
    buffered items the subset that fills the budget best (exact subset sum: the window is small and
    clips come in a few bucket sizes, so the distinct sums stay few), oldest items first on ties.

    A batch is emitted once it is within `tolerance` of the budget, or when the window is full
    (then the best fill available goes out, so memory and latency stay bounded).
    """

    def __init__(self, token_budget: int, window: int = 16, tolerance: float = 0.01):
        self.token_budget, self.window, self.tolerance = token_budget, window, tolerance
        self.buffer: List[tuple] = []

    def add(self, item, tokens: int) -> List[list]:
        if tokens > self.token_budget:
            raise ValueError(f"a sample of {tokens} tokens exceeds the token budget {self.token_budget}")
        self.buffer.append((item, tokens))
        batches = []
        while True:
            chosen = self._best_fill()
            total = sum(self.buffer[i][1] for i in chosen)
            if total < self.token_budget * (1 - self.tolerance) and len(self.buffer) < self.window:
                return batches
            batches.append([self.buffer[i][0] for i in sorted(chosen)])
            self.buffer = [entry for i, entry in enumerate(self.buffer) if i not in set(chosen)]
            if not self.buffer:
                return batches

    def _best_fill(self) -> List[int]:
        reachable = {0: ()}  # token sum -> the earliest-found subset of buffer indices reaching it
        for i, (_, tokens) in enumerate(self.buffer):
            for total, subset in list(reachable.items()):
                grown = total + tokens
                if grown <= self.token_budget and grown not in reachable:
                    reachable[grown] = subset + (i,)
        return list(reachable[max(reachable)])

    def close_all(self) -> List[list]:
        """Every buffered item, out now in best-filled batches (the last ones may be underfilled): what comes
        next must not share a batch with them (a new epoch, under data.strict_epochs)."""
        batches = []
        while self.buffer:
            chosen = set(self._best_fill())
            batches.append([self.buffer[i][0] for i in sorted(chosen)])
            self.buffer = [entry for i, entry in enumerate(self.buffer) if i not in chosen]
        return batches

    def flush(self) -> list:
        items, self.buffer = [entry[0] for entry in self.buffer], []
        return items


def stage_shapes(cfg, stage) -> List[BucketShape]:
    """The stage's buckets; a stage that mixes in images also gets 1-frame buckets."""
    ae, patch = cfg.model.autoencoder, cfg.model.patch_size
    frames = list(stage.frame_counts)
    if stage.image_fraction > 0 and 1 not in frames:
        frames.append(1)
    return bucket_shapes(stage.resolutions, stage.aspect_ratios, frames,
                         multiple=ae.spatial_factor * max(patch[1], patch[2]))

"""Generate clips from prompts with the rectified-flow sampler and write them as mp4 + gif."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import List, Sequence

import torch

from data.buckets import BucketShape
from data.video_io import write_video
from models.flow import SAMPLERS, guided


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "unconditional"


@torch.no_grad()
def generate(model, autoencoder, text, prompts: Sequence[str], shapes: Sequence[BucketShape], steps: int,
             cfg_scale: float, seed: int, reference_tokens: int, device, sampler: str = "euler") -> List[torch.Tensor]:
    """One clip per (prompt, shape) pair; returns uint8 (T, H, W, 3) videos."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    latent_shapes = [(autoencoder.latent_channels, *shape.latent_shape(autoencoder.temporal_factor,
                                                                         autoencoder.spatial_factor))
                     for shape in shapes]
    noise = [torch.randn(s, generator=generator).to(device) for s in latent_shapes]
    tokens = [math.prod(model.dit.grid(s)) for s in latent_shapes]

    def velocity(x: List[torch.Tensor], t: torch.Tensor, conditional) -> List[torch.Tensor]:
        captions = list(prompts) if conditional else list(prompts) + [""] * len(prompts)
        packed = model(x, t.to(device), text.batch(captions, device))
        return model.dit.unpatchify(packed, [tuple(xi.shape) for xi in x])

    latents = SAMPLERS[sampler](guided(velocity, cfg_scale), noise, steps, reference_tokens, tokens)
    model.train(was_training)
    return [autoencoder.decode(latent.cpu()) for latent in latents]


def write_samples(videos: Sequence[torch.Tensor], prompts: Sequence[str], out_dir: Path, fps: float) -> List[Path]:
    paths = []
    for i, (video, prompt) in enumerate(zip(videos, prompts)):
        stem = out_dir / f"{i:02d}-{_slug(prompt)}-{video.shape[2]}x{video.shape[1]}x{video.shape[0]}"
        paths.append(write_video(stem.with_suffix(".mp4"), video.numpy(), fps))
        write_video(stem.with_suffix(".gif"), video.numpy(), fps)
    return paths


def sample_plan(prompts: Sequence[str], shapes: Sequence[BucketShape], limit: int = 4):
    """Prompts paired with the stage's longest buckets, one per aspect ratio, cycling."""
    longest = max(s.frames for s in shapes)
    by_ratio = sorted({round(s.aspect_ratio, 3): s for s in shapes if s.frames == longest}.values())
    pairs = [(prompts[i % len(prompts)], by_ratio[i % len(by_ratio)])
             for i in range(min(limit, max(len(prompts), len(by_ratio))))]
    return [p for p, _ in pairs], [s for _, s in pairs]

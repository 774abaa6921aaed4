"""Latent space of the model. Built in: `pixel` (normalised RGB, no compression)."""
from __future__ import annotations

import torch

from models.config import AutoencoderConfig


class PixelSpace:
    """uint8 (T, H, W, 3) <-> float (3, T, H, W) in [-1, 1]. Stateless; real VAEs plug in beside it."""

    latent_channels = 3
    temporal_factor = 1
    spatial_factor = 1

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return video.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return latent.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)


def build_autoencoder(cfg: AutoencoderConfig):
    if cfg.name == "pixel":
        if (cfg.latent_channels, cfg.temporal_factor, cfg.spatial_factor) != (3, 1, 1):
            raise ValueError("model.autoencoder: the pixel space has 3 channels and no compression")
        return PixelSpace()
    raise ValueError(f"model.autoencoder.name={cfg.name!r}: supported: pixel")

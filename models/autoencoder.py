"""Latent spaces the DiT can train in, behind one interface.

Every autoencoder here maps a uint8 clip (T, H, W, 3) to a normalised latent
(C, t, h, w) and back, and states its channels and compression factors:
  pixel       normalised RGB, no compression (tests, the CPU demo)
  causal_vae  the built-in causal 3D VAE (models/vae.py)
  diffusers   a diffusers video autoencoder loaded from a local directory
Latents are normalised per channel, z' = (z - mean) / std, so the diffusion sees
roughly unit-variance inputs whatever the autoencoder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from models.config import AutoencoderConfig
from models.precision import frozen_dtype


def to_unit_range(video: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, H, W) in [-1, 1]."""
    return video.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def to_unit_range_batch(videos: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1]."""
    return videos.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    return x.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)


class LatentNormalizer:
    def __init__(self, channels: int, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
        mean = torch.zeros(channels) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std = torch.ones(channels) if std is None else torch.as_tensor(std, dtype=torch.float32)
        if mean.numel() != channels or std.numel() != channels:
            raise ValueError(f"latent normalisation needs {channels} means and stds, got {mean.numel()}, {std.numel()}")
        self.mean, self.std = mean.view(-1, 1, 1, 1), std.view(-1, 1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean.to(z)) / self.std.to(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z) + self.mean.to(z)


def encode_by_shape(encode, videos: Sequence[torch.Tensor], most: int = 0) -> List[torch.Tensor]:
    """`encode` (a batch of clips of one shape -> their latents) over clips of mixed shapes: one call per shape (at
    most `most` clips a call; 0 = all of them), the latents back in the clips' order."""
    groups: Dict[tuple, List[int]] = {}
    for index, video in enumerate(videos):
        groups.setdefault(tuple(video.shape), []).append(index)
    latents: List[Optional[torch.Tensor]] = [None] * len(videos)
    for same_shape in groups.values():
        step = most or len(same_shape)
        for start in range(0, len(same_shape), step):
            indices = same_shape[start:start + step]
            for index, latent in zip(indices, encode(torch.stack([videos[i] for i in indices]))):
                latents[index] = latent
    return latents


def as_unit_range_batch(videos: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, 3) clips, uint8 or float already in [-1, 1] -> (B, 3, T, H, W) in [-1, 1]."""
    return to_unit_range_batch(videos) if videos.dtype == torch.uint8 else videos.permute(0, 4, 1, 2, 3)


def pixel_frames(latent_frames: int, temporal_factor: int) -> int:
    """The pixel frames of a clip of `latent_frames` (a causal autoencoder's first latent frame holds one)."""
    return 1 + temporal_factor * (latent_frames - 1) if temporal_factor > 1 else latent_frames


class BlankLatents:
    """`blank`: the latents of a mid-grey clip (every pixel 0 in [-1, 1]) of a shape, encoded once per shape and
    kept on the autoencoder's device: what Wan 2.1 I2V's conditioning channels hold where no frame is given
    (models/conditioning.py)."""

    def blank(self, latent_shape: Sequence[int]) -> torch.Tensor:
        """(C, T, h, w) -> the latents of the mid-grey clip that encodes to that shape."""
        _, t, h, w = latent_shape
        shape = (pixel_frames(t, self.temporal_factor), h * self.spatial_factor, w * self.spatial_factor, 3)
        kept = self.__dict__.setdefault("_blank", {})
        if shape not in kept:
            dtype = getattr(self, "dtype", torch.float32)
            kept[shape] = self.encode_batch([torch.zeros(shape, dtype=dtype, device=self.device)])[0]
        return kept[shape]


class PixelSpace(BlankLatents):
    latent_channels, temporal_factor, spatial_factor = 3, 1, 1
    device = torch.device("cpu")

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return to_unit_range(video)

    def encode_batch(self, videos: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """uint8 clips (T, H, W, 3), or float ones already in [-1, 1] -> (3, T, H, W)."""
        return [as_unit_range_batch(video[None])[0].float() for video in videos]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return to_uint8(latent)


class FrozenVideoAutoencoder(BlankLatents):
    """Shared encode/decode around a frozen network: subclasses provide `_encode` and `_decode`."""

    latent_channels: int
    temporal_factor: int
    spatial_factor: int
    normalizer: LatentNormalizer
    device = torch.device("cpu")
    clips_per_call = 0  # model.autoencoder.encode_batch
    dtype_setting = "fp32"  # model.autoencoder.dtype: decided where the network is placed (`to`)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    def to(self, device) -> "FrozenVideoAutoencoder":
        self.device = torch.device(device)
        self.network.to(device=self.device, dtype=frozen_dtype(self.dtype_setting, self.device.type))
        self._blank = {}  # encoded on the former device and dtype
        return self

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.encode_batch([video])[0]

    @torch.no_grad()
    def encode_batch(self, videos: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """uint8 clips (T, H, W, 3) of mixed shapes -> their normalised latents: one network call per shape. The
        clips move to the device as uint8 (a quarter of the bytes of floats). A float clip is taken as already in
        [-1, 1] (a frame-conditioned clip's mid-grey frames, 0 there, have no uint8 value)."""
        def encode(same_shape: torch.Tensor) -> torch.Tensor:
            x = as_unit_range_batch(same_shape.to(self.device, non_blocking=True)).to(self.dtype)
            return self.normalizer.normalize(self._encode(x).float())

        return encode_by_shape(encode, videos, self.clips_per_call)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        z = self.normalizer.denormalize(latent.float()).unsqueeze(0).to(self.device, self.dtype)
        return to_uint8(self._decode(z)[0].float().clamp(-1, 1).cpu())


class BuiltinVAE(FrozenVideoAutoencoder):
    def __init__(self, cfg: AutoencoderConfig):
        from models.vae import CausalVideoVAE

        self.network = CausalVideoVAE(cfg.latent_channels, cfg.base_channels, tuple(cfg.channel_mult),
                                      tuple(cfg.temporal_downsample)).eval().requires_grad_(False)
        if cfg.path:
            from safetensors.torch import load_file

            self.network.load_state_dict(load_file(cfg.path))
        self.latent_channels = cfg.latent_channels
        self.temporal_factor, self.spatial_factor = self.network.temporal_factor, self.network.spatial_factor
        self.normalizer = LatentNormalizer(cfg.latent_channels, cfg.latent_mean, cfg.latent_std)

    def _encode(self, x):
        return self.network.encode_distribution(x)[0]

    def _decode(self, z):
        return self.network.decode(z)


class DiffusersVideoAutoencoder(FrozenVideoAutoencoder):
    """A diffusers video VAE from a local directory (config.json + weights); nothing is downloaded."""

    def __init__(self, path: str, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        import diffusers

        config = json.loads((Path(path) / "config.json").read_text())
        cls = getattr(diffusers, config["_class_name"], None)
        if cls is None:
            raise ValueError(f"{path}: diffusers has no class {config['_class_name']!r}")
        self.network = cls.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self.latent_channels = int(config.get("z_dim") or config.get("latent_channels"))
        self.temporal_factor = int(config.get("scale_factor_temporal") or config.get("temporal_compression_ratio") or 4)
        self.spatial_factor = int(config.get("scale_factor_spatial") or 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1))
        if mean is None and config.get("latents_mean") is not None:  # Wan publishes per-channel statistics
            mean, std = config["latents_mean"], config["latents_std"]
        elif mean is None and config.get("scaling_factor") is not None:  # CogVideoX-style single scale
            shift = config.get("shift_factor") or 0.0
            mean = [shift] * self.latent_channels
            std = [1.0 / config["scaling_factor"]] * self.latent_channels
        self.normalizer = LatentNormalizer(self.latent_channels, mean, std)

    def _encode(self, x):
        return self.network.encode(x).latent_dist.mode()

    def _decode(self, z):
        return self.network.decode(z).sample


def build_autoencoder(cfg: AutoencoderConfig):
    if cfg.name == "pixel":
        if (cfg.latent_channels, cfg.temporal_factor, cfg.spatial_factor) != (3, 1, 1):
            raise ValueError("model.autoencoder: the pixel space has 3 channels and no compression")
        return PixelSpace()
    if cfg.name == "causal_vae":
        vae = BuiltinVAE(cfg)
    elif cfg.name == "diffusers":
        if not cfg.path:
            raise ValueError("model.autoencoder.path must name a local diffusers autoencoder directory")
        vae = DiffusersVideoAutoencoder(cfg.path, cfg.latent_mean, cfg.latent_std)
    else:
        raise ValueError(f"model.autoencoder.name={cfg.name!r}: supported: pixel, causal_vae, diffusers")
    _check_declared(cfg, vae)
    vae.clips_per_call, vae.dtype_setting = cfg.encode_batch, cfg.dtype
    return vae.to("cpu")


def _check_declared(cfg: AutoencoderConfig, ae) -> None:
    """The config's factors drive bucket sizes before the model loads; they must match the model."""
    declared = (cfg.latent_channels, cfg.temporal_factor, cfg.spatial_factor)
    actual = (ae.latent_channels, ae.temporal_factor, ae.spatial_factor)
    if declared != actual:
        raise ValueError(f"model.autoencoder declares (latent_channels, temporal_factor, spatial_factor)={declared} "
                         f"but the autoencoder has {actual}")

"""Built-in small causal 3D video VAE: 4x temporal, 8x spatial compression by default.

Causal in time: every convolution sees only the current and earlier frames, and the
first frame is compressed on its own, so a clip of 1 + 4k frames maps to 1 + k latent
frames and a single image (1 frame) is a valid input.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.precision import cast_floating, module_dtype


class CausalConv3d(nn.Module):
    """3x3x3 convolution padded on the past side in time (first frame replicated), symmetric in space."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3):
        super().__init__()
        self.time_pad = kernel - 1
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        return self.conv(x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm within each frame: normalising across time would let later frames leak into earlier ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _per_frame(super().forward, x)


def _norm(channels: int) -> nn.Module:
    return FrameGroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = _norm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op to every frame of (B, C, T, H, W)."""
    b, c, t, h, w = x.shape
    y = fn(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


class Downsample(nn.Module):
    """2x in space (strided conv); 2x in time by folding each pair of frames into channels (learned),
    the first frame alone so the clip stays causal."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.spatial = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        if temporal:
            self.fold = nn.Conv3d(2 * channels, channels, 1)
            self.first = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _per_frame(self.spatial, x)
        if self.temporal and x.shape[2] > 1:
            first, rest = x[:, :, :1], x[:, :, 1:]
            b, c, t, h, w = rest.shape
            pairs = rest.reshape(b, c, t // 2, 2, h, w).transpose(2, 3).reshape(b, 2 * c, t // 2, h, w)
            x = torch.cat([self.first(first), self.fold(pairs)], dim=2)
        elif self.temporal:
            x = self.first(x)
        return x


class Upsample(nn.Module):
    """2x in space (nearest + conv); 2x in time by unfolding channels into each pair of frames (learned)."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.spatial = nn.Conv2d(channels, channels, 3, padding=1)
        if temporal:
            self.unfold = nn.Conv3d(channels, 2 * channels, 1)
            self.first = nn.Conv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.temporal and x.shape[2] > 1:
            first, rest = x[:, :, :1], x[:, :, 1:]
            b, c, t, h, w = rest.shape
            pairs = self.unfold(rest).reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
            x = torch.cat([self.first(first), pairs], dim=2)
        elif self.temporal:
            x = self.first(x)
        return _per_frame(lambda f: self.spatial(F.interpolate(f, scale_factor=2.0, mode="nearest")), x)


class BlockShortcut(nn.Module):
    """A learned linear codec of whole spacetime blocks (first frame alone, then blocks of `temporal`
    frames, `spatial` x `spatial` pixels), added around the conv paths. It gives the VAE a strong start
    (a block-wise linear code already beats averaging) and leaves the convolutions the residual."""

    def __init__(self, latent_channels: int, temporal: int, spatial: int):
        super().__init__()
        self.temporal, self.spatial = temporal, spatial
        first, block = 3 * spatial * spatial, 3 * temporal * spatial * spatial
        self.encode_first, self.encode_rest = nn.Conv3d(first, latent_channels, 1), nn.Conv3d(block, latent_channels, 1)
        self.decode_first, self.decode_rest = nn.Conv3d(latent_channels, first, 1), nn.Conv3d(latent_channels, block, 1)

    def _pack(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        b, c, t, h, w = x.shape
        s = self.spatial
        x = x.reshape(b, c, t // frames, frames, h // s, s, w // s, s)
        return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * frames * s * s, t // frames, h // s, w // s)

    def _unpack(self, y: torch.Tensor, frames: int) -> torch.Tensor:
        b, _, t, h, w = y.shape
        s = self.spatial
        y = y.reshape(b, 3, frames, s, s, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return y.reshape(b, 3, t * frames, h * s, w * s)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        first = self.encode_first(self._pack(x[:, :, :1], 1))
        if x.shape[2] == 1:
            return first
        return torch.cat([first, self.encode_rest(self._pack(x[:, :, 1:], self.temporal))], dim=2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        first = self._unpack(self.decode_first(z[:, :, :1]), 1)
        if z.shape[2] == 1:
            return first
        return torch.cat([first, self._unpack(self.decode_rest(z[:, :, 1:]), self.temporal)], dim=2)


class CausalVideoVAE(nn.Module):
    def __init__(self, latent_channels: int = 16, base_channels: int = 32, channel_mult: Tuple[int, ...] = (1, 2, 2),
                 temporal_downsample: Tuple[bool, ...] = (False, True, True)):
        super().__init__()
        self.latent_channels = latent_channels
        self.spatial_factor = 2 ** len(channel_mult)
        self.temporal_factor = 2 ** sum(temporal_downsample)
        widths = [base_channels * m for m in channel_mult]
        self.encoder_in = CausalConv3d(3, widths[0])
        down: List[nn.Module] = []
        channels = widths[0]
        for width, temporal in zip(widths, temporal_downsample):
            down += [ResBlock(channels, width), Downsample(width, temporal)]
            channels = width
        self.encoder = nn.Sequential(*down, ResBlock(channels, channels))
        self.encoder_out = nn.Sequential(_norm(channels), nn.SiLU(),
                                         CausalConv3d(channels, 2 * latent_channels))
        self.decoder_in = CausalConv3d(latent_channels, channels)
        up: List[nn.Module] = [ResBlock(channels, channels)]
        for width, temporal in zip(reversed(widths), reversed(temporal_downsample)):
            up += [ResBlock(channels, width), Upsample(width, temporal)]
            channels = width
        self.decoder = nn.Sequential(*up)
        self.decoder_out = nn.Sequential(_norm(channels), nn.SiLU(),
                                         CausalConv3d(channels, 3))
        self.shortcut = BlockShortcut(latent_channels, self.temporal_factor, self.spatial_factor)

    def check_frames(self, frames: int) -> None:
        if (frames - 1) % self.temporal_factor:
            raise ValueError(f"{frames} frames: the causal VAE needs 1 + {self.temporal_factor}k frames")

    def encode_distribution(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, T, H, W) in [-1, 1] -> mean, log-variance of (B, C, 1 + (T-1)/ft, H/fs, W/fs)."""
        self.check_frames(x.shape[2])
        moments = self.encoder_out(self.encoder(self.encoder_in(x)))
        mean, logvar = moments.chunk(2, dim=1)
        return mean + self.shortcut.encode(x), logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder_out(self.decoder(self.decoder_in(z))) + self.shortcut.decode(z)

    def forward(self, x: torch.Tensor, sample: bool = True, noise: torch.Tensor = None):
        """Reconstruction, mean, log-variance. `noise` (from the caller's generator) keeps training reproducible."""
        x, noise = cast_floating((x, noise), module_dtype(self))
        mean, logvar = self.encode_distribution(x)
        if sample:
            noise = torch.randn_like(mean) if noise is None else noise
            z = mean + noise * torch.exp(0.5 * logvar)
        else:
            z = mean
        return self.decode(z), mean, logvar


def vae_loss(x: torch.Tensor, reconstruction: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
             kl_weight: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reconstruction (MSE + 0.1 L1) + weighted KL to N(0, I), each per element.

    MSE keeps small objects: under L1 alone a flat background is the cheapest answer for a clip
    that is mostly background, and the shapes vanish."""
    error = reconstruction.float() - x.float()
    recon = error.pow(2).mean() + 0.1 * error.abs().mean()
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return recon + kl_weight * kl, recon, kl


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean().clamp_min(1e-12)
    return float(10 * torch.log10(4.0 / mse))

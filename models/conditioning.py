"""Conditioning frames: a clip may be given some of its own latent frames clean, and the model generates the rest.

The modes: `text` (none given: text-to-video), `first_frame` (image-to-video), `last_frame`, `first_last` (bridge
two shots), `extend` (a leading stretch of frames given: extend forwards) and `extend_backward` (a trailing
stretch). A mode picks latent frames; the model reads, per clip, its noisy latents with the given frames put back
clean, a mask and the given frames' latents (zero elsewhere), stacked on the channels, as Wan 2.1 I2V and Open-Sora
2.0 take them (`model.frame_conditioning`). A mask channel per pixel frame of a latent frame
(`model.autoencoder.temporal_factor` of them, Wan's 4) keeps that layout. Why channels and not clean tokens with
their own timestep: one packed token per latent patch either way, a text-only clip is the same sequence with a zero
mask, and Wan 2.1 I2V's weights (36 input channels) load as they are. The loss counts the generated frames only.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch

MODES = ("text", "first_frame", "last_frame", "first_last", "extend", "extend_backward")


def given_frames(mode: str, latent_frames: int, generator: torch.Generator) -> torch.Tensor:
    """Which of a clip's latent frames `mode` gives clean: a bool vector, at least one frame left to generate. The
    extension modes give a stretch of 1 to frames - 1 latent frames, drawn from `generator`."""
    if mode not in MODES:
        raise ValueError(f"conditioning mode {mode!r}: one of {', '.join(MODES)}")
    given = torch.zeros(latent_frames, dtype=torch.bool)
    if mode == "text" or latent_frames < 2:
        return given
    if mode in ("first_frame", "first_last"):
        given[0] = True
    if mode in ("last_frame", "first_last"):
        given[-1] = True
    if mode in ("extend", "extend_backward"):
        stretch = int(torch.randint(1, latent_frames, (1,), generator=generator))
        if mode == "extend":
            given[:stretch] = True
        else:
            given[latent_frames - stretch:] = True
    return given


def draw_modes(shares: Mapping[str, float], count: int, generator: torch.Generator) -> list:
    """A mode for each of `count` clips, by the stage's shares (`curriculum.stages[i].conditioning`)."""
    names = [m for m in MODES if shares.get(m, 0.0) > 0]
    weights = torch.tensor([float(shares[m]) for m in names])
    picks = torch.multinomial(weights, count, replacement=True, generator=generator)
    return [names[i] for i in picks.tolist()]


def conditioned_input(noisy: torch.Tensor, clean: torch.Tensor, given: torch.Tensor, mask_channels: int) -> torch.Tensor:
    """The model's input for one clip (C, T, H, W): [noisy with the given frames clean, mask, given latents]."""
    frames = given.to(noisy.device).view(1, -1, 1, 1)
    kept = torch.where(frames, clean, noisy)
    mask = frames.to(noisy.dtype).expand(mask_channels, -1, *noisy.shape[2:])
    return torch.cat([kept, mask, clean * frames.to(clean.dtype)])


def text_only_input(model_cfg, noisy: torch.Tensor) -> torch.Tensor:
    """One clip's input with no frame given: itself, or for a frame-conditioned model with a zero mask."""
    if not model_cfg.frame_conditioning:
        return noisy
    none = torch.zeros(noisy.shape[1], dtype=torch.bool)
    return conditioned_input(noisy, torch.zeros_like(noisy), none, model_cfg.autoencoder.temporal_factor)


def input_channels(latent_channels: int, frame_conditioning: bool, mask_channels: int) -> int:
    return 2 * latent_channels + mask_channels if frame_conditioning else latent_channels


def token_weights(given: Sequence[torch.Tensor], grids: Sequence[Sequence[int]]) -> torch.Tensor:
    """1 for each token the loss counts (a generated frame's), 0 for a given frame's, packed like the tokens (each
    clip's in t, h, w order; one latent frame a token row: patch_size[0] = 1)."""
    rows = []
    for g, (t, h, w) in zip(given, grids):
        rows.append((~g).to(torch.float32).repeat_interleave(h * w))
    return torch.cat(rows)


def draw_given(model_cfg, shares: Mapping[str, float], clean: Sequence[torch.Tensor],
               generator: torch.Generator) -> Optional[List[torch.Tensor]]:
    """Each clip's given latent frames (bool vectors), its mode drawn by `shares`; None without
    model.frame_conditioning. A text-only mix draws nothing from `generator`."""
    if not model_cfg.frame_conditioning:
        return None
    frames = [x.shape[1] for x in clean]
    if shares.get("text", 0.0) >= 1.0:
        return [torch.zeros(f, dtype=torch.bool) for f in frames]
    modes = draw_modes(shares, len(clean), generator)
    return [given_frames(m, f, generator) for m, f in zip(modes, frames)]


def conditioning_inputs(model_cfg, shares: Mapping[str, float], clean: Sequence[torch.Tensor],
                        noisy: Sequence[torch.Tensor], generator: torch.Generator, grid,
                        given: Optional[Sequence[torch.Tensor]] = None):
    """The model's inputs for a micro-batch, the weight of each packed token in the loss (a host tensor) and each
    clip's count of tokens the loss counts; both None where every token counts. Without model.frame_conditioning,
    the noisy latents as they are. Otherwise each clip is given its frames: `given`, the caller's `draw_given`
    (the trainer reads it for the image tokens too), or drawn here. `grid`: a clip's shape -> its token grid (the
    DiT's)."""
    if not model_cfg.frame_conditioning:
        return list(noisy), None, None
    given = draw_given(model_cfg, shares, clean, generator) if given is None else list(given)
    inputs = [conditioned_input(n, c, g, model_cfg.autoencoder.temporal_factor) for n, c, g in zip(noisy, clean, given)]
    if not any(bool(g.any()) for g in given):
        return inputs, None, None
    grids = [grid(x.shape) for x in clean]
    counts = [int((~g).sum()) * h * w for g, (_, h, w) in zip(given, grids)]
    return inputs, token_weights(given, grids), counts


def check_shares(shares: Mapping[str, float], key: str) -> Dict[str, float]:
    """The shares as given, or a ValueError naming the problem: known modes, each >= 0, summing to 1."""
    unknown = [m for m in shares if m not in MODES]
    if unknown:
        raise ValueError(f"{key}: unknown mode(s) {', '.join(map(repr, unknown))}; modes: {', '.join(MODES)}")
    if any(float(v) < 0 for v in shares.values()):
        raise ValueError(f"{key}: shares must be >= 0")
    if abs(sum(float(v) for v in shares.values()) - 1.0) > 1e-6:
        raise ValueError(f"{key}: shares sum to {sum(float(v) for v in shares.values()):g}, not 1")
    return {m: float(v) for m, v in shares.items()}

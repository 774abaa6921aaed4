"""Conditioning frames: a clip may be given some of its own latent frames clean, and the model generates the rest.

The modes: `text` (none given: text-to-video), `first_frame` (image-to-video), `last_frame`, `first_last` (bridge
two shots), `extend` (a leading stretch of frames given: extend forwards) and `extend_backward` (a trailing
stretch). A mode picks latent frames; the model reads, per clip, its noisy latents with the given frames put back
clean, a mask and the given frames' latents (zero elsewhere), stacked on the channels, as Wan 2.1 I2V and Open-Sora
2.0 take them (`model.frame_conditioning`). A mask channel per pixel frame of a latent frame
(`model.autoencoder.temporal_factor` of them, Wan's 4) keeps that layout. Why channels and not clean tokens with
their own timestep: one packed token per latent patch either way, a text-only clip is the same sequence with a zero
mask, and Wan 2.1 I2V's weights (36 input channels) load as they are. The loss counts the generated frames only.

A model with Wan 2.1 I2V's image branch (model.image.path) reads by default what diffusers'
WanImageToVideoPipeline gives its transformer instead (model.image.inputs=pipeline; Wan's own I2V code does the
same), so that a model fine-tuned here meets in diffusers the inputs it trained on, and a pretrained I2V model
meets here the ones it was trained on: every latent frame noisy (the model produces the given frames too, and the
loss counts every frame), a mask per pixel frame laid out as the pipeline's `mask_lat_size` (`pipeline_mask`), and
the condition latents: the autoencoder's encoding of the clip with its given pixel frames and mid-grey (0 in
[-1, 1]) everywhere else (`condition_latents`). Wan's VAE is causal, with a cache across its chunks of frames, so
the grey frames after a given first frame encode to latents that depend on that frame: a clip's condition is one
more encoding of a clip of its shape, not the given frames' latents beside the grey clip's. A latent cache stores
what depends on the clip (`cached_conditions`) and the grey clip's latents are computed once per shape
(`autoencoder.blank`).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch

from models.autoencoder import pixel_frames

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


def text_only_input(model_cfg, noisy: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One clip's input with no frame given: itself, or for a frame-conditioned model with a zero mask. Under the
    pipeline's inputs its condition channels hold the grey clip's latents: `condition`, autoencoder.blank(shape)."""
    if not model_cfg.frame_conditioning:
        return noisy
    none = torch.zeros(noisy.shape[1], dtype=torch.bool)
    if pipeline_inputs(model_cfg):
        if condition is None:
            raise ValueError("model.image.inputs=pipeline: a clip given no frame reads the grey clip's latents in "
                             "its condition channels; pass condition=autoencoder.blank(noisy.shape)")
        return pipeline_input(noisy, condition, none, model_cfg.autoencoder.temporal_factor)
    return conditioned_input(noisy, torch.zeros_like(noisy), none, model_cfg.autoencoder.temporal_factor)


def pipeline_inputs(model_cfg) -> bool:
    """Whether the model reads diffusers' WanImageToVideoPipeline's inputs (model.image.inputs=pipeline, with the
    image branch), not Kino's layout."""
    return model_cfg.pipeline_inputs


def given_pixels(given: torch.Tensor, temporal_factor: int) -> torch.Tensor:
    """The pixel frames a clip given latent frames `given` is given under the pipeline's inputs (bool, the clip's
    1 + temporal_factor x (T - 1) frames): a leading stretch of k latent frames gives the first
    1 + temporal_factor x (k - 1) pixel frames (the first latent frame holds one: the pipeline's image for k = 1), a
    trailing stretch of k the last 1 + temporal_factor x (k - 1) (k = 1: the last frame alone, FLF2V's last image).
    A clip given every latent frame (first_last on two) is given its two ends."""
    flags = [bool(x) for x in given.tolist()]
    frames = pixel_frames(len(flags), temporal_factor)
    pixels = torch.zeros(frames, dtype=torch.bool)
    if all(flags):
        lead = trail = 1
    else:
        lead = flags.index(False)
        trail = flags[::-1].index(False)
        if sum(flags) != lead + trail:
            raise ValueError(f"given latent frames {flags}: a leading and/or a trailing stretch, as the modes give")
    if lead:
        pixels[:pixel_frames(lead, temporal_factor)] = True
    if trail:
        pixels[frames - pixel_frames(trail, temporal_factor):] = True
    return pixels


def pipeline_mask(pixels: torch.Tensor, temporal_factor: int, height: int, width: int) -> torch.Tensor:
    """The pipeline's `mask_lat_size` of one clip, (temporal_factor, T, h, w): 1 on a given pixel frame, the first
    frame's value repeated temporal_factor times, then each latent frame's channels its pixel frames in order."""
    m = pixels.float()
    if temporal_factor > 1:
        m = torch.cat([m[:1].repeat(temporal_factor), m[1:]])
    return m.view(-1, temporal_factor).t()[..., None, None].expand(-1, -1, height, width)


def pipeline_input(noisy: torch.Tensor, condition: torch.Tensor, given: torch.Tensor,
                   temporal_factor: int) -> torch.Tensor:
    """The model's input for one clip (C, T, H, W) as the pipeline builds it: [noisy (every frame), mask, condition
    latents]."""
    mask = pipeline_mask(given_pixels(given, temporal_factor), temporal_factor, *noisy.shape[2:])
    return torch.cat([noisy, mask.to(noisy), condition.to(noisy)])


def condition_video(video: torch.Tensor, pixels: torch.Tensor, device, dtype=torch.float32) -> torch.Tensor:
    """A uint8 clip (F, H, W, 3) as the pipeline's `video_condition`, on `device`: its `pixels` frames in [-1, 1]
    and 0 (mid-grey) everywhere else, (F, H, W, 3) in `dtype`."""
    x = video.to(device, non_blocking=True).float().div(127.5).sub(1.0)
    return (x * pixels.to(device).view(-1, 1, 1, 1).to(x.dtype)).to(dtype)


def condition_latents(autoencoder, sources: Sequence[Optional[torch.Tensor]], given: Sequence[torch.Tensor],
                      latent_shapes: Sequence[Sequence[int]], device) -> List[torch.Tensor]:
    """Each clip's condition latents under the pipeline's inputs, on `device`. `sources[i]`: clip i's uint8 pixels
    (F, H, W, 3), encoded with its given pixel frames and grey elsewhere (one autoencoder call per shape for the
    micro-batch), or a latent cache's `cached_conditions` of it (float); a clip given no frame reads the grey
    clip's latents, encoded once per shape."""
    factor = autoencoder.temporal_factor
    out: List[Optional[torch.Tensor]] = [None] * len(given)
    videos, where = [], []
    dtype = getattr(autoencoder, "dtype", torch.float32)
    for i, (source, g, shape) in enumerate(zip(sources, given, latent_shapes)):
        if not bool(g.any()):
            out[i] = autoencoder.blank(shape).to(device)
        elif source is None:
            raise ValueError("model.image.inputs=pipeline: a clip given frames needs its pixels, or a latent cache's "
                             "condition.npy (a cache encoded for these inputs: python -m data encode)")
        elif source.dtype == torch.uint8:
            videos.append(condition_video(source, given_pixels(g, factor), device, dtype))
            where.append(i)
        else:
            out[i] = from_cache(source.to(device, non_blocking=True), g, autoencoder.blank(shape).to(device))
    for i, latent in zip(where, autoencoder.encode_batch(videos) if videos else []):
        out[i] = latent.to(device)
    return out


def cached_conditions(autoencoder, video: torch.Tensor) -> torch.Tensor:
    """What a latent cache keeps of a clip (uint8 (F, H, W, 3)) for the pipeline's inputs, (C, T + 2, h, w): the
    encoding of [its first frame, grey...] (first_frame's condition), then the last latent frame of
    [grey..., its last frame] (last_frame's) and of [first, grey..., last] (first_last's). The rest of those two is
    the grey clip's and the first one's (the autoencoder is causal: a latent frame depends on the frames up to its
    own), so `from_cache` rebuilds the three conditions whole. Extension stretches, of every length, are not kept."""
    frames = len(video)
    ends = [torch.zeros(frames, dtype=torch.bool) for _ in range(3)]
    ends[0][0] = ends[2][0] = True
    ends[1][-1] = ends[2][-1] = True
    device, dtype = autoencoder.device, getattr(autoencoder, "dtype", torch.float32)
    first, last, both = autoencoder.encode_batch([condition_video(video, e, device, dtype) for e in ends])
    return torch.cat([first, last[:, -1:], both[:, -1:]], dim=1)


def from_cache(stored: torch.Tensor, given: torch.Tensor, blank: torch.Tensor) -> torch.Tensor:
    """A clip's condition latents from its `cached_conditions` and the grey clip's latents of its shape."""
    frames = len(given)
    if stored.shape[1] != frames + 2:
        raise ValueError(f"a latent cache's condition.npy holds {stored.shape[1]} latent frames for a clip of "
                         f"{frames} (its frames + 2)")
    first, last = bool(given[0]), bool(given[-1])
    if int(given.sum()) != int(first) + int(last):
        raise ValueError("model.image.inputs=pipeline: a latent cache holds the conditions of a clip given its first "
                         "frame, its last or both; train extend and extend_backward from the videos")
    if first and last:
        return torch.cat([stored[:, :frames - 1], stored[:, frames + 1:]], dim=1)
    if first:
        return stored[:, :frames]
    return torch.cat([blank[:, :frames - 1], stored[:, frames:frames + 1]], dim=1)


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


def conditioned_timesteps(t: torch.Tensor, given: Optional[Sequence[torch.Tensor]], mean: float, std: float,
                          conditioned_mean: Optional[float] = None,
                          conditioned_std: Optional[float] = None) -> torch.Tensor:
    """Logit-normal timesteps `t` drawn around `mean` with `std`, with those of the clips given frames redrawn at
    `conditioned_mean` and `conditioned_std` (train.conditioned_timestep_mean and _std; None: the text clips'): the
    same normal draw, rescaled, so a text clip's timestep, and every later draw, stays what it was. Neither set, or no
    frame given: `t` as it is.

    Why: above t of about 0.9 a generated frame's own noisy pixels no longer show where its content is, so only there
    does the model learn to place it from the given frames; around the text clips' mean (the demo's 0.8) 1.6% of the
    clips train above 0.95, and an extension's new frames drifted back to the caption's usual place (BENCHMARKS.md,
    "Conditioning modes in the demo", x17)."""
    new_mean = mean if conditioned_mean is None else conditioned_mean
    new_std = std if conditioned_std is None else conditioned_std
    if given is None or (new_mean == mean and new_std == std):
        return t
    has = torch.tensor([bool(g.any()) for g in given], device=t.device)
    z = (torch.logit(t) - mean) / std
    return torch.where(has, torch.sigmoid(z * new_std + new_mean), t)


def conditioning_inputs(model_cfg, shares: Mapping[str, float], clean: Sequence[torch.Tensor],
                        noisy: Sequence[torch.Tensor], generator: torch.Generator, grid,
                        given: Optional[Sequence[torch.Tensor]] = None,
                        conditions: Optional[Sequence[torch.Tensor]] = None):
    """The model's inputs for a micro-batch, the weight of each packed token in the loss (a host tensor) and each
    clip's count of tokens the loss counts; both None where every token counts. Without model.frame_conditioning,
    the noisy latents as they are. Otherwise each clip is given its frames: `given`, the caller's `draw_given`
    (the trainer reads it for the image tokens too), or drawn here. `grid`: a clip's shape -> its token grid (the
    DiT's). Under the pipeline's inputs (`pipeline_inputs`) `conditions` are the clips' `condition_latents`, and
    every token counts."""
    if not model_cfg.frame_conditioning:
        return list(noisy), None, None
    given = draw_given(model_cfg, shares, clean, generator) if given is None else list(given)
    if pipeline_inputs(model_cfg):
        if conditions is None:
            raise ValueError("model.image.inputs=pipeline: the clips' condition latents (condition_latents) are needed")
        factor = model_cfg.autoencoder.temporal_factor
        return [pipeline_input(n, c, g, factor) for n, c, g in zip(noisy, conditions, given)], None, None
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

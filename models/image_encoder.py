"""The frozen image encoder of Wan 2.1 I2V (`model.image`): a transformers CLIPVisionModel from a local directory.

Wan's image-to-video pipeline (diffusers' WanImageToVideoPipeline) gives the transformer CLIP's penultimate hidden
states of the given image (`hidden_states[-2]`: 257 tokens of 1,280 for Wan's ViT-H/14), after CLIPImageProcessor's
preprocessing: the shortest side to image_size (bicubic), a centre crop, OpenAI's mean and std. Here the same runs on
the device on uint8 frames (torch's bicubic, not PIL's: equal for a frame already at image_size), and CLIP's last
layer, whose output nothing reads, is dropped.

Which images a clip is given tokens of (`image_slots`): Wan 2.1 I2V always has an image, so every clip has its
tokens, a clip given no frame (text-to-video) those of a black image. Why a black image and not masking the image
attention out: diffusers' WanTransformer3DModel cannot leave the image out of a model that has the branch (its
attention splits the image tokens off the caption's by count), so a text-only clip trained with a black image is
what the exported model computes for it in diffusers, and every clip's cross-attention has the same shape. A
one-image model reads a clip's first frame when it is given, else its last when given (last_frame,
extend_backward: the one image the clip is given), else the black image. FLF2V (model.image.images=2) reads two
slots, the first frame and the last, each the black image unless given, concatenated as diffusers does
([first; last], with its learned position embedding over both).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from models.config import ImageEncoderConfig
from models.precision import frozen_dtype

# CLIPImageProcessor's defaults, OpenAI's statistics, which Wan's image_processor/ uses too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_config(path) -> dict:
    """The encoder's config.json, checked to be a CLIP vision model (no weights read)."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    if not config.is_file():
        raise ValueError(f"model.image.path={path}: no config.json (a transformers CLIPVisionModel directory)")
    saved = json.loads(config.read_text())
    if saved.get("model_type") != "clip_vision_model":
        raise ValueError(f"model.image.path={path}: a {saved.get('model_type')!r} model, not a CLIPVisionModel "
                         "(Wan's image_encoder/)")
    return saved


def shape_problems(saved: dict, cfg: ImageEncoderConfig) -> List[str]:
    """How a CLIP config differs from model.image's dim and tokens (the DiT's image_dim and image sequence)."""
    tokens = (saved.get("image_size", 224) // saved.get("patch_size", 32)) ** 2 + 1
    problems = []
    if saved.get("hidden_size") != cfg.dim:
        problems.append(f"model.image.dim={cfg.dim}, the encoder's hidden_size is {saved.get('hidden_size')}")
    if tokens != cfg.tokens:
        problems.append(f"model.image.tokens={cfg.tokens}, the encoder gives {tokens} an image")
    return problems


def image_slots(given: torch.Tensor, images: int) -> List[Optional[str]]:
    """The frames of a clip CLIP reads, slot by slot: 'first', 'last', or None for the black image. `given`: which of
    its latent frames are given (models/conditioning.py)."""
    first, last = bool(given[0]), bool(given[-1])
    if images == 2:
        return ["first" if first else None, "last" if last else None]
    return ["first" if first else "last" if last else None]


# What fills a slot: None (the black image), a uint8 (H, W, 3) frame to encode, or its tokens (from a latent cache).
Pick = Optional[torch.Tensor]


class ImageEncoder:
    """A frozen CLIPVisionModel, outside the trained model, run under no_grad (like PretrainedTextEncoder)."""

    def __init__(self, cfg: ImageEncoderConfig):
        from transformers import CLIPVisionModel

        problems = shape_problems(clip_config(cfg.path), cfg)
        if problems:
            raise ValueError(f"model.image.path={cfg.path} does not match the config: " + "; ".join(problems))
        self.cfg = cfg
        self.network = CLIPVisionModel.from_pretrained(cfg.path, local_files_only=True).eval()
        self.network.requires_grad_(False)
        vision = getattr(self.network, "vision_model", self.network)  # transformers 4 nests it
        vision.encoder.layers = vision.encoder.layers[:-1]  # its output is hidden_states[-2]
        self.size = self.network.config.image_size
        self.device = torch.device("cpu")
        self._black = None
        self.network.to(frozen_dtype(cfg.dtype, "cpu"))

    def to(self, device) -> "ImageEncoder":
        self.device = torch.device(device)
        self.network.to(device=self.device, dtype=frozen_dtype(self.cfg.dtype, self.device.type))
        self._black = None
        return self

    def pixels(self, frame: torch.Tensor) -> torch.Tensor:
        """A uint8 (H, W, 3) frame as CLIP's input (3, size, size): shortest side to `size`, centre crop, normalised."""
        x = frame.to(self.device, non_blocking=True).permute(2, 0, 1)[None].float()
        h, w = x.shape[-2:]
        resized = (self.size, int(self.size * w / h)) if h <= w else (int(self.size * h / w), self.size)
        if resized != (h, w):  # rounded to whole values, as the processor's resized uint8 image is
            x = F.interpolate(x, size=resized, mode="bicubic", align_corners=False, antialias=True).clamp(0, 255)
            x = x.round()
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size] / 255.0
        mean, std = (torch.tensor(v, device=self.device).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        return (x[0] - mean) / std

    @torch.no_grad()
    def encode(self, frames: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 (H, W, 3) frames -> (frames, tokens, dim) fp32: CLIP's penultimate hidden states."""
        pixels = torch.stack([self.pixels(f) for f in frames]).to(next(self.network.parameters()).dtype)
        return self.network(pixel_values=pixels).last_hidden_state.float()

    def black(self) -> torch.Tensor:
        """(tokens, dim): the black image's tokens, what a slot with no given frame reads (computed once)."""
        if self._black is None:
            self._black = self.encode([torch.zeros(self.size, self.size, 3, dtype=torch.uint8)])[0]
        return self._black

    def tokens(self, picks: Sequence[Sequence[Pick]]) -> torch.Tensor:
        """(clips, slots x tokens, dim) on the device: each clip's slots in order, the frames among them encoded in
        one call."""
        frames = [p for clip in picks for p in clip if p is not None and p.dtype == torch.uint8]
        encoded = iter(self.encode(frames) if frames else [])
        rows = []
        for clip in picks:
            rows.append(torch.cat([self.black() if p is None else next(encoded) if p.dtype == torch.uint8
                                   else p.to(self.device, torch.float32) for p in clip]))
        return torch.stack(rows)


def clip_picks(given: Sequence[torch.Tensor], images: int,
               sources: Sequence[Union[torch.Tensor, None]]) -> List[List[Pick]]:
    """What fills each clip's slots. `sources[i]`: clip i's frames (uint8 (T, H, W, 3): its first and last are read),
    or a latent cache's (2, tokens, dim) tokens of them."""
    picks = []
    for g, source in zip(given, sources):
        slots = image_slots(g, images)
        picks.append([None if s is None else source[0 if s == "first" else -1] for s in slots])
    return picks


class WithImages:
    """A text conditioner whose batches also carry each clip's image tokens (TextBatch.images), those of the black
    image: what a clip given no frame reads. Whoever gives a clip frames puts theirs in its row (the trainer,
    train/generate.py). Everything else is the text conditioner's."""

    def __init__(self, text, images: ImageEncoder):
        self.text, self.image_encoder = text, images

    def to(self, device) -> "WithImages":
        self.text = self.text.to(device) if hasattr(self.text, "to") else self.text
        self.image_encoder.to(device)
        return self

    def batch(self, captions: Sequence[str], device=None):
        import dataclasses

        batch = self.text.batch(captions, device)
        black = self.image_encoder.black().repeat(self.image_encoder.cfg.images, 1)
        images = black.expand(len(captions), *black.shape).to(device or self.image_encoder.device)
        return dataclasses.replace(batch, images=images)

    def __getattr__(self, name):
        if name == "text":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.text, name)

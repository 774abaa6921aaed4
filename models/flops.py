"""Model FLOPs per training step (forward + backward), per docs/architecture.md's performance model.

Per sample with N video tokens, M text tokens and K image tokens (model.image, Wan 2.1 I2V: CLIP's per clip):
  c·P_tok·N + c·P_ctx·M + c·P_img·K + c·P_cond + attention + 12·L_text·d_text·M²
P_tok: weights applied to every video token; P_ctx: to every text token (the built-in text encoder,
cross-attention keys/values, and under joint conditioning `dit.text_in` and every block's text stream); P_cond:
once per sample (timestep/adaLN); P_img: to every image token (the image embedder, each block's added key/value
projections). c is 6 for a trained weight (forward, and backward to its input and to itself) and 4 for a frozen
one (LoRA's base: no weight gradient). Attention, per layer of width d: cross-attention conditioning
12·d·(N² + N·M + N·K) (self-attention, then N queries over M caption keys and over K image keys); joint
12·d·(N+M)², caption and video tokens in one sequence, except the last block, whose caption tokens only supply keys
and values: 12·d·N·(N+M). The last term is the built-in text encoder's own attention. Activation recompute is not counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Tuple

import torch.nn as nn


@dataclass(frozen=True)
class ParameterGroups:
    """Training FLOPs (forward + backward) of the linear layers, per video token, per text token, per sample."""
    per_video_token: int
    per_text_token: int
    per_sample: int
    per_image_token: int = 0


IMAGE_LAYERS = ("image_embedder", ".attn2.add_k_proj", ".attn2.add_v_proj")
TEXT_LAYERS = (".cross.kv", ".attn2.to_k", ".attn2.to_v", "text_embedder", "dit.text_in", ".streams.text.")


def _role(name: str) -> str:
    if name.startswith("text_encoder."):
        return "text"
    if any(part in name for part in ("time_embed", "text_pool", ".ada", "final_ada", "shared_modulation",
                                     "time_proj")):  # a text stream's adaLN projection runs once a clip too
        return "sample"
    if any(part in name for part in IMAGE_LAYERS):
        return "image"
    if any(part in name for part in TEXT_LAYERS):
        return "text"
    return "video"


# Layers whose inputs are the data (patches, timesteps, caption tokens): frozen, nothing upstream of them trains.
INPUT_LAYERS = ("text_encoder.", "dit.patch_embed", "dit.position_embed", "dit.time_embed", "dit.text_pool",
                "dit.text_in", "dit.patch_embedding", "dit.condition_embedder")


def parameter_groups(model: nn.Module) -> ParameterGroups:
    """Linear weights by what they are applied to (embedding lookups and norms cost no matmul), in training FLOPs a
    weight and token: 6 when it trains; frozen, 4 (forward, and backward to its input) where a gradient flows back
    through it, 2 (forward only) where none does: an input layer, or a layer of the text or conditioning path of a
    block when nothing on that path trains (LoRA on the video stream)."""
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    inputs = lambda name: name.startswith(INPUT_LAYERS)
    path_trains = {role: any(m.weight.requires_grad for n, m in linears if _role(n) == role and not inputs(n))
                   for role in ("video", "text", "sample", "image")}
    inputs_train = any(m.weight.requires_grad for n, m in linears if inputs(n))
    counts = {"video": 0, "text": 0, "sample": 0, "image": 0}
    for name, module in linears:
        role = _role(name)
        if module.weight.requires_grad:
            cost = 6
        elif inputs(name):
            cost = 4 if inputs_train else 2
        else:
            cost = 4 if role == "video" or path_trains[role] else 2
        counts[role] += cost * module.weight.numel()
    return ParameterGroups(counts["video"], counts["text"], counts["sample"], counts["image"])


def flops_per_sample(model: nn.Module, video_tokens: int, text_tokens: int, groups: ParameterGroups = None) -> float:
    cfg = model.cfg
    groups = groups or parameter_groups(model)
    n, m = video_tokens, text_tokens
    image = getattr(cfg, "image", None)
    k = image.images * image.tokens if image is not None and image.path else 0  # every clip has its image's
    dense = groups.per_video_token * n + groups.per_text_token * m + groups.per_image_token * k + groups.per_sample
    if getattr(cfg, "conditioning", "cross_attention") == "joint":
        attention = 12 * cfg.dim * ((cfg.depth - 1) * (n + m) ** 2 + n * (n + m))
    else:
        attention = 12 * cfg.depth * cfg.dim * (n * n + n * m + n * k)
    if getattr(model, "text_encoder", None) is not None:  # a frozen pretrained encoder is not trained
        attention += 12 * cfg.text.depth * cfg.text.dim * m * m
    return float(dense + attention)


def flops_per_batch(model: nn.Module, samples: Iterable[Tuple[int, int]], groups: ParameterGroups = None) -> float:
    """Packed batches: summed per sample (attention is per clip, never over the packed length)."""
    groups = groups or parameter_groups(model)
    return sum(flops_per_sample(model, n, m, groups) for n, m in samples)


# Dense bf16 peak FLOP/s per device (without sparsity), by a substring of the device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device_name: str):
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None

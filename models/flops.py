"""Model FLOPs per training step (forward + backward), per docs/architecture.md's performance model.

Per sample with N video tokens and M text tokens:
  6·P_tok·N + 12·L·d·N² + 12·L·d·N·M + 6·P_ctx·M + 6·P_cond + 12·L_text·d_text·M²
P_tok: weights applied to every video token; P_ctx: to every text token (text encoder,
cross-attention keys/values); P_cond: once per sample (timestep/adaLN). The last term
is the built-in text encoder's own attention. Activation recompute is not counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Tuple

import torch.nn as nn


@dataclass(frozen=True)
class ParameterGroups:
    per_video_token: int
    per_text_token: int
    per_sample: int


def _role(name: str) -> str:
    if name.startswith("text_encoder."):
        return "text"
    if ".cross.kv" in name or any(part in name for part in (".attn2.to_k", ".attn2.to_v", "text_embedder")):
        return "text"
    if any(part in name for part in ("time_embed", "text_pool", ".ada", "final_ada", "shared_modulation",
                                     "time_proj")):
        return "sample"
    return "video"


def parameter_groups(model: nn.Module) -> ParameterGroups:
    """Linear weights by what they are applied to (embedding lookups and norms cost no matmul)."""
    counts = {"video": 0, "text": 0, "sample": 0}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            counts[_role(name)] += module.weight.numel()
    return ParameterGroups(counts["video"], counts["text"], counts["sample"])


def flops_per_sample(model: nn.Module, video_tokens: int, text_tokens: int, groups: ParameterGroups = None) -> float:
    cfg = model.cfg
    groups = groups or parameter_groups(model)
    n, m = video_tokens, text_tokens
    dense = 6 * (groups.per_video_token * n + groups.per_text_token * m + groups.per_sample)
    attention = 12 * cfg.depth * cfg.dim * (n * n + n * m)
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

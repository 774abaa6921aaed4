"""Typed model configuration (Hydra structured config, group `model`)."""
from dataclasses import dataclass, field
from typing import List


@dataclass
class TextEncoderConfig:
    # Built-in byte-level encoder trained jointly with the DiT.
    dim: int = 128
    depth: int = 2
    heads: int = 4
    max_tokens: int = 64


@dataclass
class AutoencoderConfig:
    # `pixel`: the model works on normalised pixels (no compression); real VAEs come as adapters.
    name: str = "pixel"
    latent_channels: int = 3
    temporal_factor: int = 1
    spatial_factor: int = 1


@dataclass
class ModelConfig:
    name: str = "tiny"
    patch_size: List[int] = field(default_factory=lambda: [1, 4, 4])  # (p_t, p_h, p_w)
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    rope_theta: float = 10000.0
    # cross_attention: video tokens attend to text tokens in a separate layer.
    conditioning: str = "cross_attention"
    # auto | flash_attn | torch_varlen | sdpa | reference
    attention_backend: str = "auto"
    activation_checkpointing: bool = False
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

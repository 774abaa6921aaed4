"""Typed model configuration (Hydra structured config, group `model`)."""
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class TextEncoderConfig:
    # builtin: byte-level encoder trained jointly with the DiT.
    # pretrained: a frozen transformers T5/UMT5 encoder loaded from `path` (a local directory).
    name: str = "builtin"
    path: Optional[str] = None
    dim: int = 128
    depth: int = 2
    heads: int = 4
    max_tokens: int = 64
    # builtin only: bytes (UTF-8 bytes, one token each) | words (each word hashed into vocab_size ids)
    tokenizer: str = "bytes"
    vocab_size: int = 4096


@dataclass
class AutoencoderConfig:
    # pixel: normalised RGB, no compression.
    # causal_vae: the built-in causal 3D VAE (weights from `path`, a safetensors file, or trained by vae_demo).
    # diffusers: a diffusers video autoencoder (AutoencoderKLWan, AutoencoderKLCogVideoX, ...) from a local
    #   directory `path`; its factors and channels are read from its config.json.
    name: str = "pixel"
    path: Optional[str] = None
    latent_channels: int = 3
    temporal_factor: int = 1
    spatial_factor: int = 1
    # Built-in causal VAE shape: one downsampling level per entry.
    base_channels: int = 32
    channel_mult: List[int] = field(default_factory=lambda: [1, 2, 2])
    temporal_downsample: List[bool] = field(default_factory=lambda: [False, True, True])
    # Per-channel latent normalisation z' = (z - mean) / std; null = read from the model or identity.
    latent_mean: Optional[List[float]] = None
    latent_std: Optional[List[float]] = None
    # KL weight when the VAE itself is trained (experiment=vae_demo).
    kl_weight: float = 1.0e-6


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
    # joint: MM-DiT style, caption and video tokens of a clip attend together (separate weights per stream).
    conditioning: str = "cross_attention"
    # fractional: each token also gets Fourier features of its fractional (t, y, x) position in its clip,
    # added to the patch embedding (RoPE alone is relative); none: RoPE only.
    position_embedding: str = "fractional"
    # auto | flash_attn | torch_varlen | sdpa | reference
    attention_backend: str = "auto"
    # Recompute each block in backward (applied from outside the model, by train/parallelize.py).
    activation_checkpointing: bool = False
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

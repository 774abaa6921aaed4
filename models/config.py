"""Typed model configuration (Hydra structured config, group `model`) and its checks."""
from dataclasses import dataclass, field
from typing import List, Optional

from conf.errors import ConfigError

ATTENTION_BACKENDS = ("auto", "flash_attn3", "flash_attn", "torch_varlen", "cudnn", "sdpa", "reference")


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

    def check(self) -> None:
        if self.dim % self.heads:
            raise ConfigError(f"model.text.dim={self.dim} is not divisible by model.text.heads={self.heads}")
        if self.name not in ("builtin", "pretrained"):
            raise ConfigError(f"model.text.name={self.name!r}: supported: builtin, pretrained")
        if self.tokenizer not in ("bytes", "words"):
            raise ConfigError(f"model.text.tokenizer={self.tokenizer!r}: supported: bytes, words")
        if self.tokenizer == "words" and self.vocab_size < 16:
            raise ConfigError(f"model.text.vocab_size={self.vocab_size}: too small for hashed words")
        if self.name == "pretrained" and not self.path:
            raise ConfigError("model.text.path must name a local T5/UMT5 directory when model.text.name=pretrained")


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
    # Clips of one shape the frozen autoencoder encodes per call (0 = all of them in the micro-batch). Lower it
    # when a large VAE at high resolution runs out of memory.
    encode_batch: int = 4

    def check(self) -> None:
        if self.name not in ("pixel", "causal_vae", "diffusers"):
            raise ConfigError(f"model.autoencoder.name={self.name!r}: supported: pixel, causal_vae, diffusers")
        if self.encode_batch < 0:
            raise ConfigError(f"model.autoencoder.encode_batch={self.encode_batch}: must be >= 0 (0 = all)")


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
    # auto | flash_attn3 | flash_attn | torch_varlen | cudnn | sdpa | reference (models/attention.py)
    attention_backend: str = "auto"
    # Recompute each block in backward (applied from outside the model, by train/parallelize.py).
    activation_checkpointing: bool = False
    # Tiling (ALST's, applied by train/parallelize.py): run each MLP, and the output head whose result the loss
    # reads, over this many chunks of the tokens, each recomputed in backward, so their (tokens x 4 dim) and
    # (tokens x dim) activations never exist whole. For long sequences, where activations dominate. 1 = off.
    mlp_chunks: int = 1
    loss_chunks: int = 1
    # adaLN modulation. per_block: each block projects the conditioning vector itself (6 d^2 parameters and FLOPs
    # per clip a block: more expressive). shared: one projection for the whole model, each block adding learned
    # offsets (6 d parameters a block), as Wan does: at 1B dims (1536 x 24) it saves 340M parameters.
    modulation: str = "per_block"
    # Regional torch.compile of each repeated block (train/parallelize.py); null = on with CUDA when attention
    # runs a fused varlen kernel (bf16), off otherwise (per-clip SDPA breaks the graph at every attention).
    compile: Optional[bool] = None
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    def check(self) -> None:
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"model.patch_size must be three positive ints (p_t, p_h, p_w), got {self.patch_size}")
        if self.dim % self.heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.heads={self.heads}")
        if (self.dim // self.heads) % 2:
            raise ConfigError("model.dim / model.heads must be even for rotary embeddings")
        if self.conditioning not in ("cross_attention", "joint"):
            raise ConfigError(f"model.conditioning={self.conditioning!r}: supported: cross_attention, joint")
        if self.position_embedding not in ("fractional", "none"):
            raise ConfigError(f"model.position_embedding={self.position_embedding!r}: supported: fractional, none")
        if self.modulation not in ("per_block", "shared"):
            raise ConfigError(f"model.modulation={self.modulation!r}: supported: per_block, shared")
        if self.mlp_chunks < 1 or self.loss_chunks < 1:
            raise ConfigError(f"model.mlp_chunks={self.mlp_chunks} and model.loss_chunks={self.loss_chunks} "
                              f"must be >= 1 (1 = not tiled)")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"model.attention_backend={self.attention_backend!r} is not a known backend")
        self.text.check()
        self.autoencoder.check()

"""Typed model configuration (Hydra structured config, group `model`) and its checks."""
from dataclasses import dataclass, field
from typing import List, Optional

from conf.errors import ConfigError

ATTENTION_BACKENDS = ("auto", "flash_attn3", "flash_attn", "torch_varlen", "cudnn", "sdpa", "reference")
COMPILE_BACKENDS = ("inductor", "aot_eager")


@dataclass
class TextEncoderConfig:
    # builtin: byte-level encoder trained jointly with the DiT.
    # pretrained: a frozen transformers T5/UMT5 encoder loaded from `path` (a local directory).
    name: str = "builtin"
    path: Optional[str] = None
    # pretrained: the tokenizer's directory when it is not `path` (diffusers repositories keep it in tokenizer/).
    tokenizer_path: Optional[str] = None
    # pretrained: pad each caption's embeddings with zero vectors to this many tokens (Wan was trained on UMT5
    # embeddings zero-padded to 512, and its cross-attention reads the padding); null = the real tokens only.
    pad_to: Optional[int] = None
    # builtin: the encoder's width. pretrained: the width the encoder has (its config.json's d_model, which the run
    # reads), used only by estimates made where its files are not (train.memory, the launchers on a submit host).
    dim: int = 128
    depth: int = 2
    heads: int = 4
    max_tokens: int = 64
    # builtin only: bytes (UTF-8 bytes, one token each) | words (each word hashed into vocab_size ids)
    tokenizer: str = "bytes"
    vocab_size: int = 4096
    # pretrained: the dtype the frozen encoder holds its weights and computes in: auto (bf16 on CUDA, as Wan ships
    # UMT5, fp32 elsewhere) | bf16 | fp32. Its embeddings leave it in fp32 either way.
    dtype: str = "auto"

    def check(self) -> None:
        if self.dim % self.heads:
            raise ConfigError(f"model.text.dim={self.dim} is not divisible by model.text.heads={self.heads}")
        if self.name not in ("builtin", "pretrained"):
            raise ConfigError(f"model.text.name={self.name!r}: supported: builtin, pretrained")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"model.text.dtype={self.dtype!r}: supported: auto, bf16, fp32")
        if self.tokenizer not in ("bytes", "words"):
            raise ConfigError(f"model.text.tokenizer={self.tokenizer!r}: supported: bytes, words")
        if self.tokenizer == "words" and self.vocab_size < 16:
            raise ConfigError(f"model.text.vocab_size={self.vocab_size}: too small for hashed words")
        if self.pad_to is not None and self.pad_to < self.max_tokens:
            raise ConfigError(f"model.text.pad_to={self.pad_to} must be >= model.text.max_tokens={self.max_tokens}")
        if self.name == "pretrained" and not self.path:
            raise ConfigError("model.text.path must name a local T5/UMT5 directory when model.text.name=pretrained")


@dataclass
class ImageEncoderConfig:
    # Image conditioning of model.arch=wan, as Wan 2.1 I2V: a frozen transformers CLIPVisionModel from a local
    # directory (image_encoder/ of a Wan I2V diffusers repository), whose penultimate hidden states of a clip's
    # given first (or last) frame feed the DiT's image embedder and every block's added key/value projections
    # (models/image_encoder.py). null = no image branch. Needs model.frame_conditioning.
    path: Optional[str] = None
    # Images a clip is given CLIP tokens of: 1 (Wan 2.1 I2V: its first frame if given, else its last if given, else
    # a black image) or 2 (FLF2V, diffusers' pos_embed_seq_len: its first and its last frame, a black image for
    # either one not given).
    images: int = 1
    # CLIP's width (config.json's hidden_size) and tokens per image ((image_size / patch_size)^2 + 1): the DiT's
    # image_dim and image sequence. Wan's CLIP ViT-H/14 by default; checked against `path` where the run starts.
    dim: int = 1280
    tokens: int = 257
    # The dtype the frozen encoder holds its weights and computes in: auto (bf16 on CUDA, fp32 elsewhere) | bf16 |
    # fp32. Its tokens leave it in fp32 either way.
    dtype: str = "auto"
    # What the DiT reads beside a clip's noisy latents, in training and train.generate (models/conditioning.py):
    # pipeline: what diffusers' WanImageToVideoPipeline (Wan 2.1 I2V / FLF2V) gives it, so a fine-tune meets in
    #   diffusers the inputs it trained on: every frame noisy, a mask per pixel frame (the first frame's repeated
    #   temporal_factor times; FLF2V's last image is the last pixel frame alone), the autoencoder's encoding of the
    #   clip with every frame not given mid-grey (0 in [-1, 1]), and a loss over every frame (the model produces the
    #   given ones too).
    # kino: Kino's own layout (model.arch=kino's): the given latent frames put back clean among the noisy ones, a
    #   mask per latent frame, their latents with zeros elsewhere, and a loss over the generated frames only.
    inputs: str = "pipeline"

    def check(self) -> None:
        if self.images not in (1, 2):
            raise ConfigError(f"model.image.images={self.images}: 1 (Wan 2.1 I2V) or 2 (FLF2V: first and last)")
        if self.dim < 1 or self.tokens < 1:
            raise ConfigError(f"model.image.dim={self.dim} and model.image.tokens={self.tokens} must be positive")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"model.image.dtype={self.dtype!r}: supported: auto, bf16, fp32")
        if self.inputs not in ("pipeline", "kino"):
            raise ConfigError(f"model.image.inputs={self.inputs!r}: pipeline (diffusers' WanImageToVideoPipeline's "
                              "inputs) or kino (Kino's own layout)")


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
    # The dtype a frozen causal_vae / diffusers autoencoder holds its weights and runs in: auto (bf16 on CUDA, fp32
    # elsewhere) | bf16 | fp32. Its latents and decoded pixels leave it in fp32 either way.
    dtype: str = "auto"

    def check(self) -> None:
        if self.name not in ("pixel", "causal_vae", "diffusers"):
            raise ConfigError(f"model.autoencoder.name={self.name!r}: supported: pixel, causal_vae, diffusers")
        if self.encode_batch < 0:
            raise ConfigError(f"model.autoencoder.encode_batch={self.encode_batch}: must be >= 0 (0 = all)")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"model.autoencoder.dtype={self.dtype!r}: supported: auto, bf16, fp32")


@dataclass
class LoraConfig:
    # Adapter rank; 0 = no LoRA (every DiT parameter trains).
    rank: int = 0
    # Scale alpha / rank on the adapter's output; null = rank (a scale of 1).
    alpha: Optional[float] = None
    # Linear layers of the DiT to adapt: names or dotted tails of names. The default is Wan's attention and FFN
    # (model.arch=wan); Kino's DiT names them qkv, q, kv, out, fc1, fc2.
    targets: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj",
                                                        "ffn.net.2"])

    def check(self) -> None:
        if self.rank < 0 or (self.alpha is not None and self.alpha <= 0):
            raise ConfigError(f"model.lora.rank={self.rank} must be >= 0 and model.lora.alpha={self.alpha} > 0")
        if self.rank and not self.targets:
            raise ConfigError("model.lora.targets is empty: name the linear layers to adapt")

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


@dataclass
class ModelConfig:
    name: str = "tiny"
    # kino: Kino's DiT (models/dit.py). wan: the Wan 2.1 transformer (models/wan.py; image-to-video with
    # frame_conditioning and model.image), whose weights load from and export to diffusers' WanTransformer3DModel;
    # conditioning, modulation and position_embedding are Wan's own there (cross-attention, a shared table, RoPE).
    arch: str = "kino"
    patch_size: List[int] = field(default_factory=lambda: [1, 4, 4])  # (p_t, p_h, p_w)
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    # The MLP's hidden width; null = dim x mlp_ratio. Wan's are not a round ratio (1.3B: 8960 at dim 1536).
    ffn_dim: Optional[int] = None
    # Width of the sinusoidal timestep features (arch=wan; Kino's DiT uses 256).
    freq_dim: int = 256
    qk_norm: bool = True
    rope_theta: float = 10000.0
    # cross_attention: video tokens attend to text tokens in a separate layer.
    # joint: MM-DiT style, caption and video tokens of a clip attend together (separate weights per stream).
    conditioning: str = "cross_attention"
    # Conditioning frames (models/conditioning.py): the model also reads a mask and the clean latents of the frames a
    # clip is given (first frame, last, both, a stretch to extend), stacked on its input channels (2 x latent
    # channels + model.autoencoder.temporal_factor mask channels). Needed by any stage whose conditioning mix has
    # more than text. Needs patch_size[0] = 1. With arch=wan: Wan 2.1 I2V's input (36 channels for its 16 latent
    # channels), and with model.image.path its CLIP image branch too.
    frame_conditioning: bool = False
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
    # What compiles the traced blocks: inductor (generated kernels, the fast path), or aot_eager (Dynamo and
    # AOTAutograd trace the blocks, forward and backward, and run them eagerly: the same graphs and graph breaks
    # without code generation, for checking a setup's tracing quickly, e.g. on a CPU).
    compile_backend: str = "inductor"
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    # Start from an open base model: a local diffusers WanTransformer3DModel directory (model.arch=wan), checked
    # against this config key by key before any process starts. Its declared license (required with it) must
    # be in data.licenses.allow_weights; its identity (name, sha256, license) is recorded in config.yaml, every
    # checkpoint and audit.json.
    init_from: Optional[str] = None
    init_license: Optional[str] = None
    # sha256 of init_from's weight files: written by the run when it starts; set it to pin the weights (a run
    # whose directory hashes otherwise is refused).
    init_sha256: Optional[str] = None
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def mlp_hidden(self) -> int:
        return self.ffn_dim or int(self.dim * self.mlp_ratio)

    @property
    def pipeline_inputs(self) -> bool:
        """Whether the DiT reads what diffusers' WanImageToVideoPipeline gives its transformer
        (model.image.inputs=pipeline, with the image branch), not Kino's layout (models/conditioning.py)."""
        return bool(self.frame_conditioning and self.image.path and self.image.inputs == "pipeline")

    def check(self) -> None:
        if self.arch not in ("kino", "wan"):
            raise ConfigError(f"model.arch={self.arch!r}: supported: kino, wan")
        if self.arch == "wan" and self.conditioning != "cross_attention":
            raise ConfigError("model.arch=wan conditions by cross-attention (model.conditioning=cross_attention)")
        if self.ffn_dim is not None and self.ffn_dim < 1:
            raise ConfigError(f"model.ffn_dim={self.ffn_dim}: must be positive (or null for dim x mlp_ratio)")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"model.patch_size must be three positive ints (p_t, p_h, p_w), got {self.patch_size}")
        if self.dim % self.heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.heads={self.heads}")
        if (self.dim // self.heads) % 2:
            raise ConfigError("model.dim / model.heads must be even for rotary embeddings")
        if self.conditioning not in ("cross_attention", "joint"):
            raise ConfigError(f"model.conditioning={self.conditioning!r}: supported: cross_attention, joint")
        if self.frame_conditioning and self.patch_size[0] != 1:
            raise ConfigError(f"model.frame_conditioning needs model.patch_size[0] = 1 (got {self.patch_size[0]}): "
                              "a token row is then one latent frame, given or generated")
        if self.image.path and self.arch != "wan":
            raise ConfigError("model.image.path: the CLIP image branch is Wan 2.1 I2V's (set model.arch=wan)")
        if self.image.path and not self.frame_conditioning:
            raise ConfigError("model.image.path conditions on a clip's given frames: set model.frame_conditioning=true "
                              "(Wan 2.1 I2V reads them on its input channels too)")
        if self.position_embedding not in ("fractional", "none"):
            raise ConfigError(f"model.position_embedding={self.position_embedding!r}: supported: fractional, none")
        if self.modulation not in ("per_block", "shared"):
            raise ConfigError(f"model.modulation={self.modulation!r}: supported: per_block, shared")
        if self.mlp_chunks < 1 or self.loss_chunks < 1:
            raise ConfigError(f"model.mlp_chunks={self.mlp_chunks} and model.loss_chunks={self.loss_chunks} "
                              f"must be >= 1 (1 = not tiled)")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ConfigError(f"model.compile_backend={self.compile_backend!r}: supported: {', '.join(COMPILE_BACKENDS)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"model.attention_backend={self.attention_backend!r} is not a known backend")
        self.text.check()
        self.autoencoder.check()
        self.image.check()
        self.lora.check()
        if self.init_from and self.arch != "wan":
            raise ConfigError("model.init_from loads a diffusers WanTransformer3DModel: set model.arch=wan")
        if self.init_from and not self.init_license:
            raise ConfigError("model.init_from needs model.init_license: the base weights' declared license "
                              "(e.g. Apache-2.0 for Wan 2.1), recorded with every checkpoint")

    def check_lora_targets(self) -> None:
        """model.lora.targets must name linear layers of the configured DiT (built on the meta device, from the
        config alone: no files are read). For the DiT method only (conf/schema.py validate)."""
        if not self.lora.rank:
            return
        import torch

        from models.dit import TextToVideoModel, planned_context_dim
        from models.lora import lora_layers

        with torch.device("meta"):
            model = TextToVideoModel(self, with_lora=False, context=planned_context_dim(self))
        if not lora_layers(model.dit, self.lora.targets):
            names = sorted({name.rsplit(".", 1)[-1] for name, m in model.dit.named_modules()
                            if isinstance(m, torch.nn.Linear)})
            raise ConfigError(f"model.lora.targets={list(self.lora.targets)} name no linear layer of "
                              f"model.arch={self.arch}; its layers end in: {', '.join(names)}")

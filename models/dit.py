"""Video diffusion transformer over packed spacetime patches.

Clips of different (T, H, W) are patchified and concatenated into one token
sequence; 3D RoPE is computed from each clip's own grid and attention stays
within each clip, so any resolution, duration and aspect ratio mix in one batch
without padding. Conditioning: adaLN-Zero on the timestep (plus pooled caption),
cross-attention to caption tokens.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from models.conditioning import input_channels
from models.config import ModelConfig
from models.attention import varlen_attention
from models.layers import (MLP, Attention, RMSNorm, apply_rotary, cu_seqlens_from_lengths, timestep_embedding,
                           to_device)
from models.precision import cast_floating, module_dtype
from models.text_encoder import (PretrainedTextEncoder, TextBatch, TextEncoder, builtin_tokenizer,
                                 pretrained_text_dim)

Grid = Tuple[int, int, int]
POSITION_FREQUENCIES = 8


@functools.lru_cache(maxsize=256)
def _rope_angles(grid: Grid, head_dim: int, theta: float) -> torch.Tensor:
    """Per-token rotation angles (t*h*w, head_dim/2), split over the time, height and width axes."""
    axis_hw = 2 * (head_dim // 6)
    axis_dims = (head_dim - 2 * axis_hw, axis_hw, axis_hw)
    coords = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij"), -1)
    coords = coords.reshape(-1, 3)
    angles = []
    for axis, dim in enumerate(axis_dims):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles.append(coords[:, axis:axis + 1] * freqs[None])
    return torch.cat(angles, dim=-1)


@functools.lru_cache(maxsize=256)
def _fractional_features(grid: Grid, frequencies: int) -> torch.Tensor:
    """Per-token Fourier features (t*h*w, 6 * frequencies) of where the token sits in its clip, as fractions
    of the clip's own length, height and width: the same features for any resolution or duration."""
    coords = torch.stack(torch.meshgrid(*((torch.arange(n, dtype=torch.float32) + 0.5) / n for n in grid),
                                        indexing="ij"), -1).reshape(-1, 3)
    angles = coords[:, :, None] * (torch.pi * torch.arange(1, frequencies + 1, dtype=torch.float32))
    return torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(coords.shape[0], -1)


def rope_3d(grids: Sequence[Grid], head_dim: int, theta: float, device) -> Tuple[torch.Tensor, torch.Tensor]:
    angles = to_device(torch.cat([_rope_angles(tuple(g), head_dim, theta) for g in grids]), device)
    return angles.cos(), angles.sin()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class _PerToken(torch.autograd.Function):
    """index_select whose backward sums in fp32. index_select's own backward is index_add in the gradient's dtype,
    which on CUDA is bf16 atomic adds: a bf16 sum of 32,768 equal terms stops growing at 256, so every adaLN shift,
    scale and gate gradient (a sum over its clip's tokens) lost its tail in bf16 runs. The CPU kernel sums exactly;
    tests/unit/test_fp32_sums.py records the backward's ops instead."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(segments)
        ctx.rows, ctx.dtype = values.shape[0], values.dtype
        return values.index_select(0, segments)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (segments,) = ctx.saved_tensors
        total = torch.zeros(ctx.rows, *grad.shape[1:], dtype=torch.float32, device=grad.device)
        return total.index_add_(0, segments, grad.float()).to(ctx.dtype), None


def per_token(values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """(clips, d) -> (tokens, d): each token reads its clip's row, its gradient summed over them in fp32
    (`_PerToken`). Compiled, the gather fuses into the elementwise op that uses it, so no (tokens, d) copy is
    made; the old path copied all six modulation vectors to every token of every block (repeat_interleave of a
    (clips, 6d) tensor)."""
    if not values.requires_grad or values.dtype not in (torch.bfloat16, torch.float16):  # exact enough as it is
        return values.index_select(0, segments)
    return _PerToken.apply(values, segments)


def add_modulation(block: nn.Module, d: int, chunks: int, shared: bool) -> None:
    """A block's adaLN modulation, `chunks` vectors of width d per clip (see `block_modulation`).

    per_block: `block.ada`, the block's own projection of the conditioning vector (adaLN-Zero: 6d^2 parameters a
               block, zero-initialised so each block starts as the identity).
    shared:    `block.modulation`, learned (chunks, d) offsets added to one table the model projects once for every
               block (VideoDiT.shared_modulation), as Wan does."""
    block.ada = None if shared else nn.Linear(d, chunks * d)
    block.modulation = nn.Parameter(torch.zeros(chunks, d)) if shared else None
    block.modulation_chunks = chunks


def block_modulation(block: nn.Module, cond: torch.Tensor) -> List[torch.Tensor]:
    """`cond` is (clips, d) for per_block and the shared (clips, 6, d) table for shared; returns `chunks`
    (clips, d) tensors."""
    if block.ada is None:
        return (cond[:, :block.modulation_chunks] + block.modulation).unbind(1)
    return block.ada(nn.functional.silu(cond)).chunk(block.modulation_chunks, dim=-1)


def patchify(latents: Sequence[torch.Tensor], patch_size: Sequence[int]) -> torch.Tensor:
    """List of (C, T, H, W) -> packed (sum of tokens, C*pt*ph*pw), each clip's tokens in t, h, w order."""
    pt, ph, pw = patch_size
    tokens = []
    for x in latents:
        c, t, h, w = x.shape
        x = x.reshape(c, t // pt, pt, h // ph, ph, w // pw, pw)
        tokens.append(x.permute(1, 3, 5, 0, 2, 4, 6).reshape(-1, c * pt * ph * pw))
    return torch.cat(tokens)


def unpatchify(packed: torch.Tensor, shapes: Sequence[Sequence[int]], patch_size: Sequence[int]) -> List[torch.Tensor]:
    """The inverse of `patchify`, given each clip's (C, T, H, W)."""
    pt, ph, pw = patch_size
    out, start = [], 0
    for shape in shapes:
        c, t, h, w = shape
        gt, gh, gw = t // pt, h // ph, w // pw
        n = gt * gh * gw
        x = packed[start:start + n].reshape(gt, gh, gw, c, pt, ph, pw).permute(3, 0, 4, 1, 5, 2, 6)
        out.append(x.reshape(shape))
        start += n
    return out


class PatchLayout:
    """Kino's packed layout, shared by the DiTs: each clip's tokens in t, h, w order, a patch vector channel first
    (`self.patch_size` is the (pt, ph, pw) patch)."""

    def set_patch_layout(self, cfg: ModelConfig) -> int:
        """Take the config's patch and latent channels; returns the length of an output patch vector (the input's
        is `self.input_patch_dim`: more channels with conditioning frames, models/conditioning.py)."""
        self.patch_size = tuple(cfg.patch_size)
        self.channels = cfg.autoencoder.latent_channels
        volume = self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        self.input_patch_dim = volume * input_channels(self.channels, cfg.frame_conditioning,
                                                       cfg.autoencoder.temporal_factor)
        return self.channels * volume

    def grid(self, shape: Sequence[int]) -> Grid:
        _, t, h, w = shape
        pt, ph, pw = self.patch_size
        return t // pt, h // ph, w // pw

    def patchify(self, latents: Sequence[torch.Tensor]) -> torch.Tensor:
        return patchify(latents, self.patch_size)

    def unpatchify(self, packed: torch.Tensor, shapes: Sequence[Sequence[int]]) -> List[torch.Tensor]:
        return unpatchify(packed, shapes, self.patch_size)


class WholeSequence(nn.Module):
    """Which tokens of the packed sequence this forward computes: all of them. Every per-token tensor passes
    through it before the blocks. Sequence parallelism (train/sequence_parallel.py) stands a module in its place
    that keeps only this rank's contiguous share, so the model itself never knows it is split."""

    def forward(self, per_token: torch.Tensor) -> torch.Tensor:
        return per_token


class DiTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, context_dim: int):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.heads, qk_norm=cfg.qk_norm, backend=cfg.attention_backend)
        self.norm_cross = nn.LayerNorm(d, eps=1e-6)
        self.cross = Attention(d, cfg.heads, context_dim=context_dim, qk_norm=cfg.qk_norm,
                               backend=cfg.attention_backend)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(d, cfg.mlp_hidden)
        add_modulation(self, d, 6, shared=cfg.modulation == "shared")

    def forward(self, x, cond, segments, cu, max_len, rope, text, text_segments, text_cu, text_max, joint_order):
        shift1, scale1, gate1, shift2, scale2, gate2 = (per_token(m, segments) for m in block_modulation(self, cond))
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), cu, max_len, rope=rope)
        x = x + self.cross(self.norm_cross(x), cu, max_len, context=text, cu_seqlens_k=text_cu, max_len_k=text_max)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class JointBlock(nn.Module):
    """MM-DiT-style block: each clip's caption tokens and video tokens attend jointly in one sequence,
    each stream with its own projections, norms, MLP and adaLN modulation."""

    def __init__(self, cfg: ModelConfig, last: bool = False):
        super().__init__()
        d = cfg.dim
        self.core = JointAttentionCore(cfg.attention_backend)
        # The last block's caption tokens are never read again: that stream only supplies keys and values.
        self.streams = nn.ModuleDict({"video": _Stream(d, cfg), "text": _Stream(d, cfg, attend_only=last)})

    def forward(self, x, cond, segments, cu, max_len, rope, text, text_segments, text_cu, text_max, joint_order):
        video, txt = self.streams["video"], self.streams["text"]
        mv, mt = video.per_token_modulation(cond, segments), txt.per_token_modulation(cond, text_segments)
        qv, kv, vv = video.qkv(x, mv)
        qt, kt, vt = txt.qkv(text, mt)
        qv, kv = apply_rotary(qv, *rope), apply_rotary(kv, *rope)  # positions only for video tokens
        attended_video, attended_text = self.core(qv, kv, vv, qt, kt, vt, cu, text_cu, max_len, text_max, joint_order)
        text = text if txt.attend_only else txt.finish(text, attended_text, mt)
        return video.finish(x, attended_video, mv), text


class JointAttentionCore(nn.Module):
    """Joint attention itself, with no parameters (see AttentionCore): video and caption queries, keys and values
    (tokens, heads, head_dim) in, laid out clip by clip as [its caption; its video] by `order` (`joint_order`),
    attended, and handed back as (video, caption) outputs."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, qv, kv, vv, qt, kt, vt, cu, text_cu, max_len: int, text_max: int, order):
        q, k, v = (torch.cat([t_, v_])[order] for t_, v_ in ((qt, qv), (kt, kv), (vt, vv)))
        joint_cu = cu + text_cu
        # An upper bound of the longest joint sequence, known on the host (the kernels size their grid by it).
        joint_max = max_len + text_max
        out = varlen_attention(q, k, v, joint_cu, joint_cu, joint_max, joint_max, self.backend)
        unjoined = torch.empty_like(out)
        unjoined[order] = out  # back to [all text tokens; all video tokens]
        n_text = qt.shape[0]
        return unjoined[n_text:], unjoined[:n_text]


def joint_order(video_lengths: Sequence[int], text_lengths: Sequence[int]) -> torch.Tensor:
    """Indices into cat([text, video]) that lay out each clip as [its text tokens, its video tokens]. Built on the
    host from the host lengths, once per forward (the same for every block)."""
    n_text, pieces, video_start, text_start = sum(text_lengths), [], 0, 0
    for video_length, text_length in zip(video_lengths, text_lengths):
        pieces.append(torch.arange(text_start, text_start + text_length))
        pieces.append(torch.arange(video_start, video_start + video_length) + n_text)
        video_start, text_start = video_start + video_length, text_start + text_length
    return torch.cat(pieces)


class _Stream(nn.Module):
    def __init__(self, d: int, cfg: ModelConfig, attend_only: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.attend_only = cfg.heads, d // cfg.heads, attend_only
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv_proj = nn.Linear(d, 3 * d)
        self.q_norm = RMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        if not attend_only:
            self.out = nn.Linear(d, d)
            self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
            self.mlp = MLP(d, cfg.mlp_hidden)
        add_modulation(self, d, 2 if attend_only else 6, shared=cfg.modulation == "shared")

    def per_token_modulation(self, cond, segments):
        return [per_token(m, segments) for m in block_modulation(self, cond)]

    def qkv(self, x, mod):
        shift1, scale1 = mod[0], mod[1]
        q, k, v = self.qkv_proj(modulate(self.norm1(x), shift1, scale1)).view(
            x.shape[0], 3, self.heads, self.head_dim).unbind(1)
        return self.q_norm(q), self.k_norm(k), v

    def finish(self, x, attended, mod):  # attended: (tokens, heads, head_dim)
        _, _, gate1, shift2, scale2, gate2 = mod
        x = x + gate1 * self.out(attended.reshape(x.shape[0], -1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class VideoDiT(PatchLayout, nn.Module):
    def __init__(self, cfg: ModelConfig, context_dim: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        patch_dim = self.set_patch_layout(cfg)
        self.patch_embed = nn.Linear(self.input_patch_dim, d)
        # RoPE is relative: from pure noise, a token cannot tell where in the frame it is, so at high noise
        # the model can only predict a uniform field and objects never form (BENCHMARKS.md, demo experiments).
        # Fractional position features tell each token where it sits in its own clip, at any size.
        self.position_embed = nn.Linear(6 * POSITION_FREQUENCIES, d) \
            if cfg.position_embedding == "fractional" else None
        self.time_embed = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        # model.modulation=shared: one (clips, 6, d) table for every block, each block adding its own offsets.
        self.shared_modulation = nn.Linear(d, 6 * d) if cfg.modulation == "shared" else None
        self.text_pool = nn.Linear(context_dim, d)
        self.joint = cfg.conditioning == "joint"
        if self.joint:
            self.text_in = nn.Linear(context_dim, d)  # caption tokens join the sequence at model width
            self.blocks = nn.ModuleList(JointBlock(cfg, last=i == cfg.depth - 1) for i in range(cfg.depth))
        else:
            self.blocks = nn.ModuleList(DiTBlock(cfg, context_dim) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(d, 2 * d)
        self.final = nn.Linear(d, patch_dim)
        self.sequence = WholeSequence()
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for layer in self.time_embed:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        adas = [m for name, m in self.named_modules() if name.endswith(".ada")]
        adas += [self.shared_modulation] if self.shared_modulation is not None else []
        starts_silent = [self.position_embed] if self.position_embed is not None else []
        for zero in adas + starts_silent + [self.final_ada, self.final]:
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)

    def forward(self, latents: Sequence[torch.Tensor], timesteps: torch.Tensor, text: torch.Tensor,
                text_batch: TextBatch) -> torch.Tensor:
        """Velocity prediction for each clip, packed as patch tokens (same layout as `patchify`): for the tokens
        `self.sequence` keeps (all of them, unless sequence parallelism split them)."""
        grids = [self.grid(x.shape) for x in latents]
        lengths = [g[0] * g[1] * g[2] for g in grids]
        device = timesteps.device
        local = self.sequence  # every per-token tensor goes through it; per-clip ones and `cu` stay whole
        x = self.patch_embed(local(self.patchify(latents)))
        if self.position_embed is not None:
            features = torch.cat([_fractional_features(tuple(g), POSITION_FREQUENCIES) for g in grids])
            x = x + self.position_embed(local(to_device(features, x.device).to(x.dtype)))
        cu = cu_seqlens_from_lengths(lengths, device)
        lengths_t = to_device(torch.tensor(lengths), device)
        clips = torch.arange(len(lengths), device=device)
        segments = local(torch.repeat_interleave(clips, lengths_t, output_size=sum(lengths)))  # each token's clip
        text_segments = torch.repeat_interleave(clips, torch.diff(text_batch.cu_seqlens), output_size=text.shape[0])
        pooled = torch.stack([t.mean(0) for t in torch.split(text, text_batch.lengths)])
        cond = self.time_embed(timestep_embedding(timesteps, 256).to(x.dtype)) + self.text_pool(pooled)
        block_cond = cond if self.shared_modulation is None else \
            self.shared_modulation(nn.functional.silu(cond)).unflatten(-1, (6, -1))
        cos, sin = rope_3d(grids, self.cfg.dim // self.cfg.heads, self.cfg.rope_theta, device)
        rope = (local(cos.to(x.dtype)), local(sin.to(x.dtype)))
        order = to_device(joint_order(lengths, text_batch.lengths), device) if self.joint else None
        if self.joint:
            text = self.text_in(text)
        for block in self.blocks:
            args = (x, block_cond, segments, cu, max(lengths), rope, text, text_segments, text_batch.cu_seqlens,
                    text_batch.max_len, order)
            out = block(*args)
            x, text = out if self.joint else (out, text)
        return self.output(x, cond, segments)

    def output(self, x: torch.Tensor, cond: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """The output head, token by token: (tokens, dim) -> (tokens, patch_dim). Its own method so that tiling
        (model.loss_chunks, train/parallelize.py) can run it over chunks of the tokens."""
        shift, scale = (per_token(m, segments) for m in self.final_ada(nn.functional.silu(cond)).chunk(2, dim=-1))
        return self.final(modulate(self.final_norm(x), shift, scale))


class TextToVideoModel(nn.Module):
    """The trained network: video DiT (+ the built-in text encoder when captions are encoded jointly).
    Knows nothing about distribution. With a frozen pretrained text encoder, the caller passes its
    embeddings in the TextBatch (`text_conditioner` builds either kind)."""

    def __init__(self, cfg: ModelConfig, with_lora: bool = True, context: Optional[int] = None):
        """`context`: the caption width, when the caller knows it without the encoder's files (estimates)."""
        super().__init__()
        self.cfg = cfg
        if cfg.text.name not in ("builtin", "pretrained"):
            raise ValueError(f"model.text.name={cfg.text.name!r}: supported: builtin, pretrained")
        self.text_encoder = TextEncoder(cfg.text, backend=cfg.attention_backend) if cfg.text.name == "builtin" \
            else None
        context = context or context_dim(cfg)
        if cfg.arch == "wan":
            from models.wan import WanDiT  # models/wan.py builds on this module's pieces

            self.dit = WanDiT(cfg, context_dim=context)
        else:
            self.dit = VideoDiT(cfg, context_dim=context)
        if with_lora and cfg.lora.rank:  # adapters beside the chosen layers; every other parameter frozen
            from models.lora import apply_lora

            apply_lora(self, cfg.lora.rank, cfg.lora.scale_alpha, cfg.lora.targets)

    def forward(self, latents: Sequence[torch.Tensor], timesteps: torch.Tensor, text_batch: TextBatch):
        # fp32 latents and frozen-encoder embeddings enter a bf16 model in bf16; timesteps stay fp32 for
        # their sinusoidal features (the DiT casts those after computing them).
        latents, text_batch = cast_floating((list(latents), text_batch), module_dtype(self))
        context = text_batch.embeddings if text_batch.embeddings is not None else self.text_encoder(text_batch)
        return self.dit(latents, timesteps, context, text_batch)


def context_dim(cfg: ModelConfig) -> int:
    """Width of the caption tokens the DiT reads: the built-in encoder's, or the pretrained one's."""
    return cfg.text.dim if cfg.text.name == "builtin" else pretrained_text_dim(cfg.text.path)


def planned_context_dim(cfg: ModelConfig) -> int:
    """context_dim for estimates made before the run, possibly where the pretrained encoder's files are not (a
    submit host): its config.json when it is here, else model.text.dim, the width the config says it has."""
    if cfg.text.name == "pretrained" and cfg.text.path and (Path(cfg.text.path) / "config.json").is_file():
        return pretrained_text_dim(cfg.text.path)
    return cfg.text.dim


def attention_shapes(cfg: ModelConfig) -> List[Tuple[int, int]]:
    """(heads, head dim) of each attention the trained model runs: the DiT's, and the built-in text encoder's."""
    shapes = [(cfg.heads, cfg.dim // cfg.heads)]
    if cfg.text.name == "builtin" and (cfg.text.heads, cfg.text.dim // cfg.text.heads) not in shapes:
        shapes.append((cfg.text.heads, cfg.text.dim // cfg.text.heads))
    return shapes


def text_conditioner(cfg: ModelConfig):
    """captions -> TextBatch: byte tokens for the built-in encoder, or frozen T5/UMT5 embeddings; with model.image
    (Wan 2.1 I2V), each caption's clip also carries the black image's CLIP tokens until given frames' replace them
    (models/image_encoder.py)."""
    if cfg.text.name == "pretrained":
        text = PretrainedTextEncoder(cfg.text.path, cfg.text.max_tokens, cfg.text.tokenizer_path, cfg.text.pad_to,
                                     cfg.text.dtype)
    else:
        text = builtin_tokenizer(cfg.text)
    if cfg.image.path:
        from models.image_encoder import ImageEncoder, WithImages

        return WithImages(text, ImageEncoder(cfg.image))
    return text


def parameter_count(module: nn.Module) -> int:
    # a parameter partitioned by ZeRO-3 keeps its full size in ds_numel
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())

"""`model.arch=wan`: the Wan 2.1 transformer's math in Kino's packed varlen form, text- and image-to-video.

The same computation as diffusers' `WanTransformer3DModel` (the 1.3B and 14B text-to-video checkpoints, and with
model.frame_conditioning and model.image the 14B image-to-video ones: 36 input channels, CLIP image tokens through
an image embedder into each block's cross-attention, models/image_encoder.py), so its weights load and export both
ways (models/wan_weights.py) and its outputs match, clip by clip. In Kino's form clips of mixed shapes are packed
into one token sequence, attention stays within each clip (cu_seqlens), and everything Kino applies from outside
(sequence parallelism, tiling, activation checkpointing, compile, ZeRO) applies unchanged: the blocks have the
signature of `models.dit.DiTBlock` (plus the image tokens) and the model the interface of `models.dit.VideoDiT`
(patchify, grid, `sequence`, `output`).

Parameter names are diffusers' (`blocks.0.attn1.to_q.weight`, ...). Two tensors differ in layout only: the patch
embedding is a Linear over Kino's patch vectors (diffusers: a Conv3d of the same weights), and the output
projection's rows follow Kino's patch layout (channel first).
"""
from __future__ import annotations

import functools
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import ModelConfig
from models.dit import Grid, PatchLayout, WholeSequence, per_token
from models.layers import AttentionCore, cu_seqlens_from_lengths, timestep_embedding, to_device
from models.text_encoder import TextBatch


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input's dtype (Wan normalises in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


@functools.lru_cache(maxsize=256)
def _interleaved_angles(grid: Grid, head_dim: int, theta: float) -> torch.Tensor:
    """Per-token angles (t*h*w, head_dim/2) for rotating channel pairs (2i, 2i+1): head_dim split over time, height
    and width as Wan splits it, frequencies computed in float64 as Wan's are."""
    hw = 2 * (head_dim // 6)
    axis_dims = (head_dim - 2 * hw, hw, hw)
    coords = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing="ij"), -1)
    coords = coords.reshape(-1, 3)
    angles = []
    for axis, dim in enumerate(axis_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
        angles.append(coords[:, axis:axis + 1] * freqs[None])
    return torch.cat(angles, dim=-1)


def rope_interleaved(grids: Sequence[Grid], head_dim: int, theta: float, device) -> Tuple[torch.Tensor, torch.Tensor]:
    angles = torch.cat([_interleaved_angles(tuple(g), head_dim, theta) for g in grids])
    return to_device(angles.cos().float(), device), to_device(angles.sin().float(), device)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair of adjacent channels (2i, 2i+1) of every head by its token's angle; x: (N, H, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class WanAttention(nn.Module):
    """Self-attention (3D RoPE) or cross-attention to the caption, with RMS norm of q and k across all heads. With
    `images` (Wan 2.1 I2V's cross-attention), the same queries also attend to the clip's image tokens through their
    own key/value projections (`add_k_proj`, `add_v_proj`, `norm_added_k`), and the two results are summed: two
    softmaxes, as diffusers computes it, not one over image and caption tokens together."""

    def __init__(self, dim: int, heads: int, eps: float, backend: str, cross: bool, images: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.cross = heads, dim // heads, cross
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        if images:  # diffusers' added_kv_proj_dim: the image embedder's output, the model's width
            self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)
        self.core = AttentionCore(backend)

    def forward(self, x, cu_seqlens, max_len, rope=None, context=None, cu_seqlens_k=None, max_len_k=None,
                images=None):
        """`images`: (packed image tokens at model width, their cu_seqlens, tokens a clip), or None."""
        source = x if context is None else context
        if context is None:
            cu_seqlens_k, max_len_k = cu_seqlens, max_len
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, self.head_dim))
        k = self.norm_k(self.to_k(source)).unflatten(-1, (self.heads, self.head_dim))
        v = self.to_v(source).unflatten(-1, (self.heads, self.head_dim))
        if rope is not None:
            q, k = apply_rotary_interleaved(q, *rope), apply_rotary_interleaved(k, *rope)
        out = self.core(q, k, v, cu_seqlens, cu_seqlens_k, max_len, max_len_k).type_as(q)
        if images is not None:
            tokens, cu_images, max_images = images
            k = self.norm_added_k(self.add_k_proj(tokens)).unflatten(-1, (self.heads, self.head_dim))
            v = self.add_v_proj(tokens).unflatten(-1, (self.heads, self.head_dim))
            out = out + self.core(q, k, v, cu_seqlens, cu_images, max_len, max_images).type_as(q)
        return self.to_out[0](out.flatten(1))


class WanFeedForward(nn.Module):
    """Linear, GELU (tanh-approximated in the blocks, exact in the image embedder), Linear; named as diffusers'
    FeedForward (`net.0.proj`, `net.2`)."""

    def __init__(self, dim: int, hidden: int, out: int = None, approximate: str = "tanh"):
        super().__init__()
        first = nn.Module()
        first.proj = nn.Linear(dim, hidden)
        self.net = nn.ModuleList([first, nn.Dropout(0.0), nn.Linear(hidden, out or dim)])
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate=self.approximate))


class WanBlock(nn.Module):
    """One Wan block: modulated self-attention, cross-attention (normalised input, no gate), modulated FFN. Its
    six modulation vectors per clip are the model's shared table plus this block's `scale_shift_table`."""

    def __init__(self, cfg: ModelConfig, eps: float = 1e-6):
        super().__init__()
        d = cfg.dim
        self.norm1 = FP32LayerNorm(d, eps, elementwise_affine=False)
        self.attn1 = WanAttention(d, cfg.heads, eps, cfg.attention_backend, cross=False)
        self.attn2 = WanAttention(d, cfg.heads, eps, cfg.attention_backend, cross=True, images=bool(cfg.image.path))
        self.norm2 = FP32LayerNorm(d, eps, elementwise_affine=True)
        self.ffn = WanFeedForward(d, cfg.mlp_hidden)
        self.norm3 = FP32LayerNorm(d, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, d) / d ** 0.5)

    def forward(self, x, cond, segments, cu, max_len, rope, text, text_segments, text_cu, text_max, joint_order,
                images=None):
        """`cond`: the (clips, 6, d) table the model projects from each clip's timestep; `images`: the clips' image
        tokens for the cross-attention (WanAttention), or None."""
        shift, scale, gate, c_shift, c_scale, c_gate = (
            per_token(m.squeeze(1), segments) for m in (self.scale_shift_table + cond.float()).chunk(6, dim=1))
        normed = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.attn1(normed, cu, max_len, rope=rope) * gate).type_as(x)
        normed = self.norm2(x.float()).type_as(x)
        x = x + self.attn2(normed, cu, max_len, context=text, cu_seqlens_k=text_cu, max_len_k=text_max, images=images)
        normed = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(normed).float() * c_gate).type_as(x)


class FP32Linear(nn.Linear):
    """A Linear computed in fp32 whatever its parameters' dtype. diffusers keeps Wan's `time_embedder` in fp32
    (`_keep_in_fp32_modules`); a bf16 DeepSpeed engine holds every parameter in bf16 (one dtype an engine, the
    fp32 master in the optimizer), so here the weights are upcast at use and the matmul and its sums are fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class _Sequential(nn.Module):
    """linear_1, activation, linear_2: diffusers' TimestepEmbedding and PixArtAlphaTextProjection by name."""

    def __init__(self, in_dim: int, dim: int, activation, linear=nn.Linear):
        super().__init__()
        self.linear_1, self.linear_2, self.activation = linear(in_dim, dim), linear(dim, dim), activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.activation(self.linear_1(x)))


class WanImageEmbedding(nn.Module):
    """CLIP image tokens to the model's width (diffusers' WanImageEmbedding): LayerNorm, an exact-GELU MLP as wide as
    its input, LayerNorm. FLF2V adds a learned position embedding over its two images' tokens first, so the model
    tells the first frame's from the last's (`pos_embed`, diffusers' pos_embed_seq_len)."""

    def __init__(self, image_dim: int, dim: int, tokens: int = None):
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim)
        self.ff = WanFeedForward(image_dim, image_dim, out=dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, image_dim)) if tokens else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(clips, tokens, image_dim) -> (clips, tokens, dim)."""
        if self.pos_embed is not None:
            images = images + self.pos_embed
        return self.norm2(self.ff(self.norm1(images)))


class WanConditionEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int, text_dim: int, image=None):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = _Sequential(freq_dim, dim, nn.SiLU(), linear=FP32Linear)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = _Sequential(text_dim, dim, nn.GELU(approximate="tanh"))
        if image is not None and image.path:  # model.image: Wan 2.1 I2V's image branch
            position = image.images * image.tokens if image.images == 2 else None
            self.image_embedder = WanImageEmbedding(image.dim, dim, position)


class WanDiT(PatchLayout, nn.Module):
    def __init__(self, cfg: ModelConfig, context_dim: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        patch_dim = self.set_patch_layout(cfg)
        self.patch_embedding = nn.Linear(self.input_patch_dim, d)  # diffusers: a Conv3d, kernel = stride = patch
        self.condition_embedder = WanConditionEmbedder(d, cfg.freq_dim, context_dim, cfg.image)
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = FP32LayerNorm(d, 1e-6, elementwise_affine=False)
        self.proj_out = nn.Linear(d, patch_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, d) / d ** 0.5)
        self.sequence = WholeSequence()
        self._init_weights()

    def _init_weights(self) -> None:
        """From scratch: Wan's published initialisation (Xavier linears, zero biases; the output starts at zero),
        so that a run without `model.init_from` starts where Wan's own training did."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.proj_out.weight)

    def forward(self, latents: Sequence[torch.Tensor], timesteps: torch.Tensor, text: torch.Tensor,
                text_batch: TextBatch) -> torch.Tensor:
        """Velocity for each clip, packed as patch tokens: for the tokens `self.sequence` keeps. `timesteps` in
        [0, 1] (diffusers' Wan takes them x 1000)."""
        grids = [self.grid(x.shape) for x in latents]
        lengths = [g[0] * g[1] * g[2] for g in grids]
        device = timesteps.device
        local = self.sequence
        x = self.patch_embedding(local(self.patchify(latents)))
        cu = cu_seqlens_from_lengths(lengths, device)
        clips = torch.arange(len(lengths), device=device)
        segments = local(torch.repeat_interleave(clips, to_device(torch.tensor(lengths), device),
                                                 output_size=sum(lengths)))
        embedder = self.condition_embedder
        frequencies = timestep_embedding(timesteps, embedder.freq_dim)
        temb = embedder.time_embedder(frequencies).type_as(text)  # fp32 inside (FP32Linear), as diffusers keeps it
        table = embedder.time_proj(F.silu(temb)).unflatten(1, (6, -1))  # (clips, 6, d), shared by every block
        context = embedder.text_embedder(text)
        images = self.image_context(text_batch.images, len(lengths), device)
        cos, sin = rope_interleaved(grids, self.cfg.dim // self.cfg.heads, self.cfg.rope_theta, device)
        rope = (local(cos), local(sin))
        for block in self.blocks:
            x = block(x, table, segments, cu, max(lengths), rope, context, None, text_batch.cu_seqlens,
                      text_batch.max_len, None, images)
        return self.output(x, temb, segments)

    def image_context(self, images, clips: int, device):
        """Each clip's image tokens embedded and packed, with their cu_seqlens and count a clip, for the blocks'
        cross-attention; None for a model without the image branch. Every clip has as many (models/image_encoder.py),
        and every rank of a sequence-parallel group holds them all, as it does the caption's."""
        embedder = getattr(self.condition_embedder, "image_embedder", None)
        if embedder is None:
            if images is not None:
                raise ValueError("image tokens given to a model without an image branch (model.image.path)")
            return None
        if images is None or images.shape[0] != clips:
            raise ValueError(f"this model reads each clip's image tokens (model.image: Wan 2.1 I2V): "
                             f"TextBatch.images must hold {clips} clips' (models/image_encoder.py)")
        per_clip = images.shape[1]
        packed = embedder(images).flatten(0, 1)
        return packed, cu_seqlens_from_lengths([per_clip] * clips, device), per_clip

    def output(self, x: torch.Tensor, temb: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """The output head, token by token (tiled by model.loss_chunks like VideoDiT's). Its modulation is fp32,
        as diffusers' (its scale_shift_table is kept in fp32), whatever the parameters' dtype."""
        shift, scale = (per_token(m.squeeze(1), segments)
                        for m in (self.scale_shift_table.float() + temb[:, None].float()).chunk(2, dim=1))
        return self.proj_out((self.norm_out(x.float()) * (1 + scale) + shift).type_as(x))

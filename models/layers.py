"""Building blocks shared by the DiT and the text encoder."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from models.attention import varlen_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x), approximate="tanh"))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head by per-token angles; x: (N, H, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class AttentionCore(nn.Module):
    """The attention call itself, (tokens, heads, head_dim) in and out, with no parameters: a module of its own so
    that what is applied from outside (sequence parallelism, train/sequence_parallel.py) can stand in its place."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_q: int, max_k: int) -> torch.Tensor:
        return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, self.backend)


class Attention(nn.Module):
    """Multi-head attention over packed sequences: self-attention, or cross-attention when given a context."""

    def __init__(self, dim: int, heads: int, context_dim: int = None, qk_norm: bool = True, backend: str = "auto"):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.core = AttentionCore(backend)
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(context_dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.out = nn.Linear(dim, dim)

    def forward(self, x, cu_seqlens, max_len, rope=None, context=None, cu_seqlens_k=None, max_len_k=None):
        n = x.shape[0]
        if self.cross:
            q = self.q(x).view(n, self.heads, self.head_dim)
            k, v = self.kv(context).view(context.shape[0], 2, self.heads, self.head_dim).unbind(1)
        else:
            q, k, v = self.qkv(x).view(n, 3, self.heads, self.head_dim).unbind(1)
            cu_seqlens_k, max_len_k = cu_seqlens, max_len
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = self.core(q, k, v, cu_seqlens, cu_seqlens_k, max_len, max_len_k)
        return self.out(out.reshape(n, -1))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled to [0, 1000] as in DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A tensor built on the host, sent to `device` without waiting for the copy: a blocking copy would make the
    host wait for the device's queue to drain, which the step never does (no host synchronisation)."""
    return host.to(device, non_blocking=True) if device is not None else host


def cu_seqlens_from_lengths(lengths, device) -> torch.Tensor:
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + int(length))
    return to_device(torch.tensor(cu, dtype=torch.int32), device)

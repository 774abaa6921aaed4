"""One varlen attention call over packed sequences, with interchangeable backends.

Packed tensors are (total_tokens, heads, head_dim); `cu_seqlens` marks where each
sample starts, and attention never crosses samples. The backend is chosen once:
flash-attn's varlen kernel when installed (CUDA), PyTorch's varlen kernel on CUDA,
else PyTorch SDPA per sample (which itself picks flash/efficient/math kernels).
"""
from __future__ import annotations

import functools
import importlib.util
from typing import List

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "torch_varlen", "sdpa", "reference")


class BackendUnavailable(RuntimeError):
    pass


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _has_torch_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device: torch.device) -> List[str]:
    found = []
    if device.type == "cuda" and _has_flash_attn():
        found.append("flash_attn")
    if device.type == "cuda" and _has_torch_varlen():
        found.append("torch_varlen")
    return found + ["sdpa", "reference"]


@functools.lru_cache(maxsize=None)
def resolve_backend(requested: str, device_type: str) -> str:
    """The backend to use: the fastest available for 'auto', else the one forced (checked)."""
    found = available_backends(torch.device(device_type))
    if requested == "auto":
        return found[0]
    if requested not in BACKENDS:
        raise BackendUnavailable(f"unknown attention backend {requested!r}; known: {', '.join(BACKENDS)}")
    if requested not in found:
        raise BackendUnavailable(f"attention backend {requested!r} is not available on {device_type} "
                                 f"(available: {', '.join(found)})")
    return requested


def _split(x: torch.Tensor, lengths: List[int]):
    return torch.split(x, lengths, dim=0)


def _sdpa(q, k, v, q_lengths, k_lengths):
    outputs = []
    for qi, ki, vi in zip(_split(q, q_lengths), _split(k, k_lengths), _split(v, k_lengths)):
        # (n, h, d) -> (1, h, n, d) for SDPA
        out = F.scaled_dot_product_attention(qi.transpose(0, 1)[None], ki.transpose(0, 1)[None],
                                             vi.transpose(0, 1)[None])
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs, dim=0)


def _reference(q, k, v, q_lengths, k_lengths):
    outputs = []
    scale = q.shape[-1] ** -0.5
    for qi, ki, vi in zip(_split(q, q_lengths), _split(k, k_lengths), _split(v, k_lengths)):
        scores = torch.einsum("qhd,khd->hqk", qi.float(), ki.float()) * scale
        outputs.append(torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), vi.float()).to(q.dtype))
    return torch.cat(outputs, dim=0)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_q: int, max_k: int, backend: str = "auto") -> torch.Tensor:
    """Attention of each sample's queries over that sample's keys; (Nq, H, D) -> (Nq, H, D)."""
    backend = resolve_backend(backend, q.device.type)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), max_q, max_k)
    if backend == "torch_varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), max_q, max_k)
    q_lengths = torch.diff(cu_seqlens_q).tolist()
    k_lengths = torch.diff(cu_seqlens_k).tolist()
    if backend == "sdpa":
        return _sdpa(q, k, v, q_lengths, k_lengths)
    return _reference(q, k, v, q_lengths, k_lengths)

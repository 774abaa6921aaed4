"""One varlen attention call over packed sequences, with interchangeable backends.

Packed tensors are (total_tokens, heads, head_dim); `cu_seqlens` marks where each
sample starts, and attention never crosses samples. The backend is chosen per
(request, device type, dtype), once: the fused varlen kernels (flash-attn's, then
PyTorch's `varlen_attn`) run on CUDA in fp16/bf16 only, so `auto` takes them there
and falls back to PyTorch SDPA per sample (flash / memory-efficient / math kernels,
fp32 included) everywhere else. See docs/gpu.md.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("flash_attn", "torch_varlen", "sdpa", "reference")
FUSED_VARLEN = ("flash_attn", "torch_varlen")  # CUDA-only, fp16/bf16-only kernels
HALF_DTYPES = (torch.float16, torch.bfloat16)


class BackendUnavailable(RuntimeError):
    pass


def _probe_installed() -> Dict[str, bool]:
    """Which fused kernels this interpreter has, probed once at import: never inside a forward, where a
    module lookup would cost time on every step and break a compiled graph."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        torch_varlen = True
    except ImportError:
        torch_varlen = False
    return {"flash_attn": importlib.util.find_spec("flash_attn") is not None, "torch_varlen": torch_varlen}


_INSTALLED = _probe_installed()
_RESOLVED: Dict[Tuple[str, str, torch.dtype], str] = {}


def available_backends(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> List[str]:
    """Backends that can run q/k/v of `dtype` on `device`, fastest first."""
    fused = [name for name in FUSED_VARLEN
             if device.type == "cuda" and dtype in HALF_DTYPES and _INSTALLED[name]]
    return fused + ["sdpa", "reference"]


def resolve_backend(requested: str, device_type: str, dtype: torch.dtype = torch.bfloat16) -> str:
    """The backend for this request, device type and dtype: the fastest that supports them for 'auto',
    else the one forced (checked). Decided once per combination, and logged when `auto` has to leave the
    fused kernels on CUDA (fp32 there runs at a fraction of their speed)."""
    key = (requested, device_type, dtype)
    backend = _RESOLVED.get(key)
    if backend is None:
        backend = _resolve(requested, device_type, dtype)
        _RESOLVED[key] = backend
    return backend


def _resolve(requested: str, device_type: str, dtype: torch.dtype) -> str:
    if requested != "auto" and requested not in BACKENDS:
        raise BackendUnavailable(f"unknown attention backend {requested!r}; known: {', '.join(BACKENDS)}")
    found = available_backends(torch.device(device_type), dtype)
    if requested == "auto":
        chosen = found[0]
        if device_type == "cuda" and chosen not in FUSED_VARLEN:
            installed = [name for name in FUSED_VARLEN if _INSTALLED[name]]
            why = (f"the fused varlen kernels ({', '.join(installed)}) take fp16/bf16 only" if installed
                   else "no fused varlen kernel is installed (flash-attn, or torch >= 2.9 for varlen_attn)")
            log.warning("attention: %s on cuda runs per-sample SDPA: %s; zero.precision=bf16 uses them",
                        str(dtype).replace("torch.", ""), why)
        return chosen
    if requested not in found:
        needs = " (it takes fp16/bf16 on CUDA only)" if requested in FUSED_VARLEN else ""
        raise BackendUnavailable(f"attention backend {requested!r} is not available on {device_type} for "
                                 f"{str(dtype).replace('torch.', '')}{needs}; available: {', '.join(found)}")
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
    backend = resolve_backend(backend, q.device.type, q.dtype)
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

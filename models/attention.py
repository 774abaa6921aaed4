"""One varlen attention call over packed sequences, with interchangeable backends.

Packed tensors are (total_tokens, heads, head_dim); `cu_seqlens` marks where each
sample starts, and attention never crosses samples. The backend is chosen per
(request, device type, dtype), once. The fused varlen kernels (FlashAttention-3's
`flash_attn_interface` on Hopper, flash-attn 2, PyTorch's `varlen_attn`) run on CUDA in
fp16/bf16 only; where several are installed, `auto` times each once on a representative
packed batch and takes the fastest. Elsewhere it falls back to PyTorch SDPA per sample
(flash / memory-efficient / math kernels, fp32 included); `cudnn` is SDPA per sample held
to cuDNN's kernel, for comparison. See docs/gpu.md.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("flash_attn3", "flash_attn", "torch_varlen", "cudnn", "sdpa", "reference")
FUSED_VARLEN = ("flash_attn3", "flash_attn", "torch_varlen")  # CUDA-only, fp16/bf16-only varlen kernels
HOPPER_ONLY = ("flash_attn3",)
HALF_DTYPES = (torch.float16, torch.bfloat16)


class BackendUnavailable(RuntimeError):
    pass


def _probe_installed() -> Dict[str, bool]:
    """Which fused kernels this interpreter has, probed once at import: never inside a forward, where a
    module lookup would cost time on every step and break a compiled graph. Found, not imported: importing
    torch's varlen module imports Dynamo (1.7 s a process on the 2-core machine, where it never runs)."""
    try:
        torch_varlen = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except ImportError:
        torch_varlen = False
    try:
        from torch.nn.attention import SDPBackend

        cudnn = hasattr(SDPBackend, "CUDNN_ATTENTION")
    except ImportError:
        cudnn = False
    return {"flash_attn3": importlib.util.find_spec("flash_attn_interface") is not None,
            "flash_attn": importlib.util.find_spec("flash_attn") is not None, "torch_varlen": torch_varlen,
            "cudnn": cudnn}


_INSTALLED = _probe_installed()
_RESOLVED: Dict[Tuple[str, str, torch.dtype], str] = {}


def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] == 9


def available_backends(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> List[str]:
    """Backends that can run q/k/v of `dtype` on `device`: the fused varlen kernels first (in their usual order
    of speed), then the per-clip ones."""
    if device.type != "cuda" or dtype not in HALF_DTYPES:
        return ["sdpa", "reference"]
    fused = [name for name in FUSED_VARLEN if _INSTALLED[name] and (name not in HOPPER_ONLY or _is_hopper(device))]
    return fused + (["cudnn"] if _INSTALLED["cudnn"] else []) + ["sdpa", "reference"]


def fastest(candidates: Sequence[str], seconds: Callable[[str], float]) -> Tuple[Optional[str], Dict[str, float]]:
    """The candidate with the least measured time (None when every one failed), and every measurement (a
    candidate that fails is left out)."""
    times = {}
    for name in candidates:
        try:
            times[name] = seconds(name)
        except Exception as error:  # a kernel built for another GPU, an unsupported head size
            log.warning("attention: %s failed its timing run and is not used: %s", name, error)
    if not times:
        return None, times
    return min(times, key=times.get), times


Shape = Tuple[int, int]  # (heads, head dim) of the attention that asks
DIT_SHAPE: Shape = (12, 128)  # a video DiT's, for a caller that does not say


def _time_backend(name: str, device: torch.device, dtype: torch.dtype, shape: Shape = DIT_SHAPE) -> float:
    """Forward and backward of one packed batch of two clips with the asking model's heads and head dim (a kernel
    may reject a head dim: FlashAttention takes at most 256, some builds multiples of 8 only). Resolution may first
    happen under no_grad or inference mode (generation, evaluation): the timing needs its backward."""
    heads, head_dim = shape
    with torch.inference_mode(False), torch.enable_grad():
        lengths = [6144, 2048]
        cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=device)
        q, k, v = (torch.randn(sum(lengths), heads, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))

        def once():
            varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), name).sum().backward()

        once()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(5):
            once()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / 5


def resolve_backend(requested: str, device_type: str, dtype: torch.dtype = torch.bfloat16,
                    shape: Shape = DIT_SHAPE) -> str:
    """The backend for this request, device type, dtype and (heads, head dim): for 'auto' the fastest that runs
    them (on CUDA every fused kernel is tried on that shape first, so one that rejects it is left out before the
    model's first forward), else the one forced (checked). Decided once per combination, and logged when `auto`
    has to leave the fused kernels on CUDA (fp32 there runs at a fraction of their speed)."""
    key = (requested, device_type, dtype, tuple(shape))
    backend = _RESOLVED.get(key)
    if backend is None:
        backend = _resolve(requested, device_type, dtype, tuple(shape))
        _RESOLVED[key] = backend
    return backend


def pin_backend(requested: str, device_type: str, dtype: torch.dtype, backend: str, shape: Shape = DIT_SHAPE) -> None:
    """Fix what `requested` resolves to (e.g. every rank takes rank 0's measured choice)."""
    _RESOLVED[(requested, device_type, dtype, tuple(shape))] = backend


def _resolve(requested: str, device_type: str, dtype: torch.dtype, shape: Shape) -> str:
    if requested != "auto" and requested not in BACKENDS:
        raise BackendUnavailable(f"unknown attention backend {requested!r}; known: {', '.join(BACKENDS)}")
    found = available_backends(torch.device(device_type), dtype)
    if requested == "auto":
        fused = [name for name in found if name in FUSED_VARLEN]
        chosen = "sdpa"  # cudnn (per clip, one kernel only) is never auto's pick
        if fused:  # even one is tried on the model's shape: a kernel may take bf16 and still reject its head dim
            device = torch.device(device_type)
            chosen, times = fastest(fused, lambda name: _time_backend(name, device, dtype, shape))
            chosen = chosen or "sdpa"
            log.info("attention: measured %s for %d heads of %d; auto takes %s",
                     ", ".join(f"{name} {1000 * t:.2f} ms" for name, t in times.items()) or "nothing",
                     shape[0], shape[1], chosen)
        if device_type == "cuda" and chosen not in FUSED_VARLEN:
            installed = [name for name in FUSED_VARLEN if _INSTALLED[name]]
            why = (f"the fused varlen kernels ({', '.join(installed)}) take fp16/bf16 only" if installed
                   else "no fused varlen kernel is installed (flash-attn, or torch >= 2.9 for varlen_attn)")
            log.warning("attention: %s on cuda runs per-sample SDPA: %s; zero.precision=bf16 uses them",
                        str(dtype).replace("torch.", ""), why)
        return chosen
    if requested not in found:
        needs = (" (it runs on Hopper GPUs only, in fp16/bf16)" if requested in HOPPER_ONLY else
                 " (it takes fp16/bf16 on CUDA only)" if requested in FUSED_VARLEN + ("cudnn",) else "")
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
    backend = resolve_backend(backend, q.device.type, q.dtype, (q.shape[1], q.shape[2]))
    if backend == "flash_attn3":
        from flash_attn_interface import flash_attn_varlen_func as flash_attn3_varlen

        out = flash_attn3_varlen(q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), max_q, max_k)
        return out[0] if isinstance(out, tuple) else out  # some releases also return the log-sum-exp
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), max_q, max_k)
    if backend == "torch_varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_seqlens_q.int(), cu_seqlens_k.int(), max_q, max_k)
    q_lengths = torch.diff(cu_seqlens_q).tolist()
    k_lengths = torch.diff(cu_seqlens_k).tolist()
    if backend == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return _sdpa(q, k, v, q_lengths, k_lengths)
    if backend == "sdpa":
        return _sdpa(q, k, v, q_lengths, k_lengths)
    return _reference(q, k, v, q_lengths, k_lengths)

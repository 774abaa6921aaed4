"""Each fused attention kernel's call, as models/attention.py makes it, bound against the kernel's own signature.

The kernels run on CUDA only. torch's varlen_attn and cuDNN SDPA are real here: varlen_attn runs on meta tensors
(its fake implementation checks the arguments and gives the output's shape) and on the CPU fails with the kernel's
own "no CPU backend" error, not a TypeError; cuDNN SDPA on the CPU fails with SDPA's own "no viable backend".
flash-attn 2 and FlashAttention-3 cannot be installed here (they build against CUDA): stand-ins with their
published signatures (flash_attn.flash_attn_varlen_func, hopper's flash_attn_interface.flash_attn_varlen_func)
take the call, so a misplaced or missing argument fails as it would on the GPU."""
import sys
import types

import pytest
import torch

from models import attention

LENGTHS = [5, 3, 9]  # three clips packed, the longest last


def packed(device="meta", dtype=torch.bfloat16, heads=2, head_dim=8):
    total = sum(LENGTHS)
    q, k, v = (torch.empty(total, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], device=device, dtype=torch.int64)
    return q, k, v, cu


def forced(monkeypatch, backend):
    """Dispatch straight to `backend`, as a CUDA bf16 run resolves it."""
    monkeypatch.setattr(attention, "resolve_backend", lambda requested, device_type, dtype=None, shape=None: backend)


def flash_attn_2_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                        softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                        deterministic=False, return_attn_probs=False, block_table=None):
    CALLS.append(dict(q=q, k=k, v=v, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, max_q=max_seqlen_q, max_k=max_seqlen_k,
                      causal=causal))
    return torch.empty_like(q)


def flash_attn_3_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                        seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                        pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
    CALLS.append(dict(q=q, k=k, v=v, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, max_q=max_seqlen_q, max_k=max_seqlen_k,
                      causal=causal))
    return torch.empty_like(q), torch.empty(q.shape[1], q.shape[0], device=q.device)  # (out, softmax_lse)


CALLS = []


@pytest.mark.parametrize("backend, module, function", [
    ("flash_attn", "flash_attn", flash_attn_2_varlen),
    ("flash_attn3", "flash_attn_interface", flash_attn_3_varlen)])
def test_flash_attention_is_called_with_its_own_argument_layout(monkeypatch, backend, module, function):
    stand_in = types.ModuleType(module)
    stand_in.flash_attn_varlen_func = function
    monkeypatch.setitem(sys.modules, module, stand_in)
    forced(monkeypatch, backend)
    CALLS.clear()
    q, k, v, cu = packed()
    out = attention.varlen_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), backend)
    (call,) = CALLS
    assert out.shape == q.shape and out.dtype == q.dtype  # FA3's (out, lse) is unpacked
    assert call["q"] is q and call["k"] is k and call["v"] is v
    for name in ("cu_q", "cu_k"):  # the kernels take int32 offsets, one more than clips
        assert call[name].dtype == torch.int32 and call[name].shape == (len(LENGTHS) + 1,)
    assert call["max_q"] == call["max_k"] == max(LENGTHS) and type(call["max_q"]) is int
    assert call["causal"] is False  # a video DiT attends both ways


def test_torch_varlen_attn_binds_and_gives_the_packed_shape(monkeypatch):
    forced(monkeypatch, "torch_varlen")
    q, k, v, cu = packed("meta")
    out = attention.varlen_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), "torch_varlen")
    assert out.shape == (sum(LENGTHS), 2, 8) and out.dtype == torch.bfloat16
    q, k, v, cu = packed("cpu")
    with pytest.raises(NotImplementedError, match=r"_flash_attention_forward.*'CPU' backend"):
        attention.varlen_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), "torch_varlen")  # CUDA only


def test_cudnn_attention_on_the_cpu_fails_in_sdpa_not_in_our_call(monkeypatch):
    forced(monkeypatch, "cudnn")
    q, k, v, cu = packed("cpu")
    q, k, v = (torch.randn_like(x) for x in (q, k, v))
    with pytest.raises(RuntimeError, match="No viable backend for scaled_dot_product_attention"):
        attention.varlen_attention(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), "cudnn")

"""The one place model inputs meet the model's compute dtype.

A model trained in bf16 (DeepSpeed converts its parameters) is fed by fp32 producers: latents from the
autoencoder, noisy inputs mixed in fp32, embeddings from a frozen text encoder. Each model casts its
floating inputs to its own parameter dtype on entry, so training, sampling, evaluation and export
(and anything else that calls the model) agree without each caller remembering to cast. Targets and
losses stay in fp32: only what enters the network changes precision.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch


FROZEN_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # model.text.dtype / model.autoencoder.dtype


def frozen_dtype(setting: str, device_type: str) -> torch.dtype:
    """model.text.dtype / model.autoencoder.dtype on a device: what a frozen encoder holds its weights and computes
    in. auto is bf16 on CUDA (about half the memory of fp32: UMT5-XXL's 5.7B parameters take 11 GB, not 23) and
    fp32 elsewhere (CPUs gain little from bf16 matmuls)."""
    if setting == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return FROZEN_DTYPES[setting]


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype the module computes in: that of its first floating parameter (ZeRO-3 partitions keep it)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.get_default_dtype()


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """`value` with every floating tensor in it cast to `dtype`: tensors, lists/tuples, and dataclasses such as
    TextBatch (whose integer ids and offsets stay as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floating(v, dtype) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: cast_floating(getattr(value, f.name), dtype) for f in dataclasses.fields(value)
                   if isinstance(getattr(value, f.name), (torch.Tensor, list, tuple))}
        return dataclasses.replace(value, **changes)
    return value

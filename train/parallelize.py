"""Everything applied to a built model that is not its math, in one place and one fixed order:

1. activation checkpointing of the repeated blocks (`model.activation_checkpointing`);
2. regional compile: each repeated block compiled in place (`model.compile`; by default on with CUDA). Blocks
   of one shape share the compiled code, so compiling costs one block's time, not the model's;
3. sequence parallelism (issue 13 adds it here);
4. the DeepSpeed engine (ZeRO), last: it wraps what the steps above made.

Model code has no switch for any of them. Each step keeps parameter names as they are, so checkpoints
load whichever of them a run turns on or off.
"""
from __future__ import annotations

import functools
from typing import List

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.dit import DiTBlock, JointBlock
from conf.schema import KinoConfig
from train.engine import DistEnv, build_engine, compute_dtype

# The units activation checkpointing (and later compile) apply to: a transformer's repeated blocks.
REPEATED_BLOCKS = (DiTBlock, JointBlock)


def repeated_blocks(model: nn.Module) -> List[nn.Module]:
    return [module for module in model.modules() if isinstance(module, REPEATED_BLOCKS)]


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Each repeated block keeps only its inputs for backward and recomputes the rest. The block's forward is
    replaced on the instance, not wrapped in another module, so no parameter name changes. Returns the number of
    blocks. Submodules are still called as modules during recompute, so ZeRO-3 gathers their parameters."""
    blocks = repeated_blocks(model)
    for block in blocks:
        block.forward = functools.partial(_checkpointed_forward, block, block.forward)
    return len(blocks)


def _checkpointed_forward(block: nn.Module, forward, *args, **kwargs):
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def compile_wanted(cfg: KinoConfig, device_type: str) -> bool:
    """`model.compile`, or by default: on with CUDA when attention runs a fused varlen kernel (bf16 runs). The
    per-clip SDPA fallback (fp32 on CUDA, the CPU) reads clip lengths on the host, which breaks the compiled graph
    at every attention and recompiles for every new mix of clip lengths: there eager is faster."""
    if cfg.model.compile is not None:
        return cfg.model.compile
    from models.attention import FUSED_VARLEN, resolve_backend

    return device_type == "cuda" and resolve_backend(cfg.model.attention_backend, device_type,
                                                     compute_dtype(cfg)) in FUSED_VARLEN


def apply_compile(model: nn.Module) -> int:
    """Compile each repeated block in place (`nn.Module.compile`: parameter names do not change). Returns the
    number of blocks."""
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile()
    return len(blocks)


def parallelize(model: nn.Module, cfg: KinoConfig, env: DistEnv, load_universal: bool = False):
    """Apply the steps above to `model` (on its device already) and return the DeepSpeed engine."""
    if cfg.model.activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile_wanted(cfg, env.device.type):
        apply_compile(model)
    return build_engine(model, cfg, env, load_universal=load_universal)

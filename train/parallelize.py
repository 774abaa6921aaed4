"""Everything applied to a built model that is not its math, in one place and one fixed order:

1. sequence parallelism (`parallel.sequence`, train/sequence_parallel.py): the DiT's per-token tensors and
   attention split over a group of ranks;
2. tiling (`model.mlp_chunks`, `model.loss_chunks`): each MLP and the output head over chunks of the tokens;
3. activation checkpointing of the repeated blocks (`model.activation_checkpointing`);
4. regional compile: each repeated block compiled in place (`model.compile`; by default on with CUDA). Blocks
   of one shape share the compiled code, so compiling costs one block's time, not the model's;
5. under ZeRO-3 (eager), linear layers that keep their weight parameter, not its gathered tensor, for backward;
6. the DeepSpeed engine (ZeRO), last: it wraps what the steps above made.

Model code has no switch for any of them. Each step keeps parameter names as they are, so checkpoints
load whichever of them a run turns on or off.
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.dit import DiTBlock, JointBlock
from models.layers import MLP
from models.wan import WanBlock, WanFeedForward
from conf.schema import KinoConfig
from train.engine import DistEnv, build_engine, compute_dtype
from train.sequence_parallel import SequenceLayout, SequenceSplit, apply_sequence_parallel

# The units activation checkpointing (and later compile) apply to: a transformer's repeated blocks.
REPEATED_BLOCKS = (DiTBlock, JointBlock, WanBlock)
FEED_FORWARDS = (MLP, WanFeedForward)  # what model.mlp_chunks tiles


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


def apply_tiling(model: nn.Module, mlp_chunks: int, loss_chunks: int) -> None:
    """ALST's tiling for a DiT: each MLP of the repeated blocks, and the DiT's output head (the last activations
    before the loss), run over chunks of the tokens, each chunk checkpointed, so backward recomputes one chunk's
    (tokens x 4 dim) or (tokens x dim) activations at a time. Forwards are replaced on the instances: no
    parameter name changes."""
    if mlp_chunks > 1:
        for block in repeated_blocks(model):
            for mlp in (m for m in block.modules() if isinstance(m, FEED_FORWARDS)):
                mlp.forward = functools.partial(_tiled, mlp.forward, mlp_chunks)
    if loss_chunks > 1:
        dit = model.dit
        dit.output = functools.partial(_tiled_output, dit.output, loss_chunks)


def _tiled(forward, chunks: int, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return torch.cat([forward(part) for part in x.tensor_split(chunks)])
    return torch.cat([checkpoint(forward, part, use_reentrant=False) for part in x.tensor_split(chunks)])


def _tiled_output(output, chunks: int, x: torch.Tensor, cond: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    parts = zip(x.tensor_split(chunks), segments.tensor_split(chunks))
    if not torch.is_grad_enabled():
        return torch.cat([output(xs, cond, ss) for xs, ss in parts])
    return torch.cat([checkpoint(output, xs, cond, ss, use_reentrant=False) for xs, ss in parts])


def compile_wanted(cfg: KinoConfig, device_type: str) -> bool:
    """`model.compile`, or by default: on with CUDA when attention runs a fused varlen kernel (bf16 runs). The
    per-clip SDPA fallback (fp32 on CUDA, the CPU) reads clip lengths on the host, which breaks the compiled graph
    at every attention and recompiles for every new mix of clip lengths: there eager is faster."""
    if cfg.model.compile is not None:
        return cfg.model.compile
    from models.attention import FUSED_VARLEN, resolve_backend
    from models.dit import attention_shapes

    return device_type == "cuda" and resolve_backend(cfg.model.attention_backend, device_type, compute_dtype(cfg),
                                                     attention_shapes(cfg.model)[0]) in FUSED_VARLEN


def apply_compile(model: nn.Module, backend: str = "inductor") -> int:
    """Compile each repeated block's forward in place (parameter names do not change). Returns the number of
    blocks."""
    blocks = repeated_blocks(model)
    for block in blocks:
        # The forward, not the module's call: hooks on the block (ZeRO-3's gather and release) stay outside the
        # graph, where they run eagerly, instead of breaking it at its first and last line.
        block.forward = torch.compile(block.forward, backend=backend)
    return len(blocks)


def gather_blocks_whole(model: nn.Module) -> None:
    """Under ZeRO-3 with compile: each repeated block is one ZeRO-3 leaf, whose parameters are gathered before the
    block and released after it, with no hook inside. ZeRO-3 otherwise hooks every submodule, and each hook (not
    traceable: torch.compiler.disable) cut a compiled block into a graph per layer (seen on 1 CPU rank: 67 graph
    breaks in a 2-block model over 2 steps; as leaves, with the forward compiled inside the block's hooks, none
    but the per-clip attention's on the CPU). A block's weights are then whole on every rank while it runs, as
    ZeRO-3's prefetch of its layers mostly held them anyway."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, sorted({type(block) for block in repeated_blocks(model)}, key=lambda t: t.__name__))


def compile_report() -> Dict[str, Any]:
    """What Dynamo did in this process so far: the graphs it captured, the frames it compiled, each graph break
    with its reason and count, and the recompilations. A block that fell back to eager captures no graph; a break
    nobody expected shows up here by name (the trainer logs this at the end of a compiled run)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"].get("unique_graphs", 0)),
            "frames_compiled": int(counters["frames"].get("ok", 0)),
            "frames_seen": int(counters["frames"].get("total", 0)),
            "graph_breaks": {str(reason): int(n) for reason, n in counters["graph_break"].items()},
            "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0}


def break_kind(reason: str) -> str:
    """A graph break's reason without what varies between frames: its first line, and the function it names."""
    import re

    named = re.search(r"function `?<function (\S+) at", reason)
    return reason.splitlines()[0][:160] + (f" ({named.group(1)})" if named else "")


def describe_compile(report: Dict[str, Any]) -> str:
    breaks: Counter = Counter()
    for reason, n in report["graph_breaks"].items():
        breaks[break_kind(reason)] += n
    said = "; ".join(f"{n}x {reason}" for reason, n in sorted(breaks.items()))
    return (f"{report['graphs']} graph(s) from {report['frames_compiled']} compiled frame(s), "
            f"{sum(breaks.values())} graph break(s){': ' + said if said else ''}")


class _LinearsKeepParameters(torch.overrides.TorchFunctionMode):
    """Routes F.linear over a ZeRO-3 parameter through DeepSpeed's linear function, which saves the parameter for
    backward and gathers it again there. Autograd's own linear saves the gathered weight (a view of it): every
    layer's whole weight then stayed on each rank from its forward to its backward, the whole model at the end of
    the forward (measured: 1.5 GB of saved weights in a 0.28B fp32 model on 2 CPU ranks)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if hasattr(weight, "ds_id"):
                from deepspeed.runtime.zero.linear import zero3_linear_wrap

                return zero3_linear_wrap(*args, **kwargs)
        return func(*args, **kwargs)


def apply_zero3_linears(model: nn.Module) -> int:
    """Step 5: each linear layer's forward runs with _LinearsKeepParameters (replaced on the instance: LoRA's
    adapted forward included). Per layer, not around the model's forward, so activation checkpointing's
    recomputation in backward, outside the model's forward, saves what the forward saved. Returns the number of
    layers."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for layer in layers:
        layer.forward = functools.partial(_forward_keeping_parameters, layer.forward)
    return len(layers)


def _forward_keeping_parameters(forward, *args, **kwargs):
    with _LinearsKeepParameters():
        return forward(*args, **kwargs)


def parallelize(model: nn.Module, cfg: KinoConfig, env: DistEnv, layout: Optional[SequenceLayout] = None,
                load_universal: bool = False):
    """Apply the steps above to `model` (on its device already). Returns the DeepSpeed engine and, under
    sequence parallelism, the split the trainer cuts its targets with (else None)."""
    split: Optional[SequenceSplit] = None
    if layout is not None and layout.parallel:
        split = apply_sequence_parallel(model, layout)
    apply_tiling(model, cfg.model.mlp_chunks, cfg.model.loss_chunks)
    if cfg.model.activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile_wanted(cfg, env.device.type):
        if cfg.zero.stage == 3:
            gather_blocks_whole(model)
        apply_compile(model, cfg.model.compile_backend)
    elif cfg.zero.stage == 3:
        apply_zero3_linears(model)
    return build_engine(model, cfg, env, load_universal=load_universal), split

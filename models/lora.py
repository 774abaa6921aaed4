"""LoRA adapters (`model.lora.*`): a low-rank update beside chosen linear layers of the DiT, the rest frozen.

Each targeted `nn.Linear` keeps its own parameters under their names and gains two children, `lora_A` (rank x in)
and `lora_B` (out x rank, zero at the start), so the adapter's tensors are named as peft and diffusers name them
(`blocks.0.attn1.to_q.lora_A.weight`): adapters export to diffusers' LoRA format by renaming nothing, and a run's
checkpoints keep the base layer's names. y = W x + b + (alpha / rank) B A x.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Sequence

import torch
import torch.nn as nn


def _targeted(name: str, targets: Sequence[str]) -> bool:
    return any(name == target or name.endswith("." + target) for target in targets)


def lora_layers(module: nn.Module, targets: Sequence[str]) -> List[str]:
    """The names of `module`'s linear layers the targets pick (a target is a name or a dotted name's tail)."""
    return [name for name, child in module.named_modules() if isinstance(child, nn.Linear)
            and not name.endswith(("lora_A", "lora_B")) and _targeted(name, targets)]


def _lora_forward(layer: nn.Linear, scale: float, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x, layer.weight, layer.bias) + layer.lora_B(layer.lora_A(x)) * scale


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> int:
    """Attach adapters to `model.dit`'s targeted layers and freeze every other parameter of `model` (the caption
    encoder included). Returns the number of adapted layers; raises when the targets pick none."""
    names = lora_layers(model.dit, targets)
    if not names:
        raise ValueError(f"model.lora.targets={list(targets)} name no linear layer of the DiT")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers = dict(model.dit.named_modules())
    for name in names:
        layer = layers[name]
        layer.lora_A = nn.Linear(layer.in_features, rank, bias=False, device=layer.weight.device)
        layer.lora_B = nn.Linear(rank, layer.out_features, bias=False, device=layer.weight.device)
        init_adapter(f"{name}.lora_A.weight", layer.lora_A.weight)
        init_adapter(f"{name}.lora_B.weight", layer.lora_B.weight)
        layer.forward = functools.partial(_lora_forward, layer, alpha / rank)
    return len(names)


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


@torch.no_grad()
def init_adapter(name: str, weight: torch.Tensor) -> None:
    """An adapter's starting value, as peft starts it: A as nn.Linear's default (Kaiming uniform), B at zero, so
    the adapted model starts as its base. Also what a model built on the meta device gets (train/materialize.py)."""
    if ".lora_A." in name:
        nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
    else:
        nn.init.zeros_(weight)


def adapter_state(dit_state: Dict[str, torch.Tensor], rank: int, alpha: float) -> Dict[str, torch.Tensor]:
    """The adapters alone, their scale folded into B (so a loader's default alpha = rank reproduces them)."""
    scale = alpha / rank
    return {name: (tensor * scale if ".lora_B." in name else tensor) for name, tensor in dit_state.items()
            if ".lora_A." in name or ".lora_B." in name}


def merged_state(dit_state: Dict[str, torch.Tensor], rank: int, alpha: float) -> Dict[str, torch.Tensor]:
    """Base weights with each adapter's update added in, adapters dropped: a plain model's state dict."""
    scale = alpha / rank
    merged = {name: tensor for name, tensor in dit_state.items() if ".lora_A." not in name and ".lora_B." not in name}
    for name, a in dit_state.items():
        if name.endswith(".lora_A.weight"):
            layer = name[: -len(".lora_A.weight")]
            b = dit_state[f"{layer}.lora_B.weight"]
            merged[f"{layer}.weight"] = merged[f"{layer}.weight"] + scale * (b.float() @ a.float()).to(
                merged[f"{layer}.weight"].dtype)
    return merged

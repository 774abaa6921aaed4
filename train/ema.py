"""Exponential moving average of the weights, kept in fp32 on the main rank.

The decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates, so a
short run's EMA follows training instead of staying near the initial weights.
"""
from __future__ import annotations

from typing import Dict

import torch


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow: Dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in module.named_parameters()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, p in module.named_parameters():
            if p.requires_grad:  # a frozen parameter (LoRA's base) never moves from its start
                self.shadow[name].lerp_(p.detach().float(), weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> Dict[str, object]:
        return {"updates": self.updates, "weights": {name: t.cpu() for name, t in self.shadow.items()}}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        weights = state["weights"]
        mismatch = set(self.shadow) ^ set(weights)
        if mismatch:
            raise ValueError(f"EMA state does not match the model: {sorted(mismatch)[:5]}")
        for name, tensor in weights.items():
            self.shadow[name].copy_(tensor)
        self.updates = int(state["updates"])

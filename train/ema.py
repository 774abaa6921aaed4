"""Exponential moving average of the weights, kept in fp32 on the main rank."""
from __future__ import annotations

from typing import Dict

import torch


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow: Dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters():
            p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {name: t.cpu() for name, t in self.shadow.items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)

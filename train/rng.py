"""Every random number a rank draws, as JSON-able state, so resume is bit-exact."""
from __future__ import annotations

import base64
import random
from typing import Any, Dict

import numpy as np
import torch


class RNGState:
    """Owns the rank's training generator (noise, timesteps, caption dropout) and the global RNGs."""

    def __init__(self, seed: int, rank: int):
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        torch.manual_seed(seed)  # identical model init on every rank
        random.seed(seed + rank)
        np.random.seed((seed + rank) % (2 ** 32))

    def state_dict(self) -> Dict[str, Any]:
        np_state = np.random.get_state()
        state = {
            "generator": base64.b64encode(self.generator.get_state().numpy().tobytes()).decode(),
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        }
        if torch.cuda.is_available():
            state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        def tensor(text: str) -> torch.Tensor:
            return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

        self.generator.set_state(tensor(state["generator"]))
        torch.set_rng_state(tensor(state["torch"]))
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensor(state["cuda"]))

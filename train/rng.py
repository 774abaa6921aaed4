"""Every random number a rank draws, as JSON-able state, so resume is bit-exact."""
from __future__ import annotations

import base64
import logging
import random
from typing import Any, Dict

import numpy as np
import torch


def host_values(tensor: torch.Tensor) -> list:
    """The values of a tensor drawn on the host (the per-clip choices of `RNGState.generator`). Reading them costs
    no device synchronisation; a device tensor here is a bug, so it is refused."""
    if tensor.device.type != "cpu":
        raise ValueError(f"host_values got a tensor on {tensor.device}: reading it would synchronise the device")
    return tensor.tolist()


class RNGState:
    """Owns the rank's training generators and the global RNGs.

    `generator` (host) draws the few per-clip choices: caption dropout and timesteps. `noise_generator` draws the
    noise, as large as the latents, where the latents are: on a GPU it is a generator of that device, so no noise
    crosses the bus; on the CPU it is `generator` itself. Both are per rank and saved, so resume stays exact.
    """

    def __init__(self, seed: int, rank: int, device: torch.device = torch.device("cpu")):
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        self.noise_generator = self.generator if device.type == "cpu" else \
            torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank + 500_009)
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
        if self.noise_generator is not self.generator:
            state["noise_generator"] = base64.b64encode(self.noise_generator.get_state().numpy().tobytes()).decode()
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
        if self.noise_generator is not self.generator:
            if "noise_generator" in state:
                self.noise_generator.set_state(tensor(state["noise_generator"]))
            else:  # written on the CPU or by an earlier version: the noise continues from the seed instead
                logging.getLogger("kino").warning("the checkpoint holds no device noise generator state: noise "
                                                  "continues from the seed, so this resume is not bit-exact")

"""Rectified flow: x_t = (1 - t) x_0 + t ε, the network predicts v = ε - x_0; t = 1 is pure noise."""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch


def sample_timesteps(count: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Logit-normal timesteps: most mass in the middle, where the velocity is hardest to predict."""
    return torch.sigmoid(torch.randn(count, generator=generator) * std + mean)


def shift_timesteps(t: torch.Tensor, num_tokens, reference_tokens: int) -> torch.Tensor:
    """Longer sequences keep more signal at equal t, so move them toward noise: shift = sqrt(n / n_ref)."""
    shift = torch.sqrt(torch.as_tensor(num_tokens, dtype=torch.float32) / reference_tokens)
    return shift * t / (1 + (shift - 1) * t)


def noisy_pair(x0: torch.Tensor, noise: torch.Tensor, t: float):
    """The network input at time t and its velocity target."""
    return (1 - t) * x0 + t * noise, noise - x0


Velocity = Callable[[List[torch.Tensor], torch.Tensor], List[torch.Tensor]]


def _steps(steps: int, reference_tokens: int, tokens: Sequence[int]):
    """(t_now, t_next, per-clip dt) for each step of every clip's own shifted schedule, from 1 to 0."""
    grid = torch.linspace(1.0, 0.0, steps + 1)
    schedules = torch.stack([shift_timesteps(grid, n, reference_tokens) for n in tokens])  # (clips, steps+1)
    for i in range(steps):
        t_now, t_next = schedules[:, i], schedules[:, i + 1]
        yield t_now, t_next, (t_next - t_now).tolist()


def euler_sample(velocity: Velocity, noise: Sequence[torch.Tensor], steps: int, reference_tokens: int,
                 tokens: Sequence[int]) -> List[torch.Tensor]:
    """Integrate dx/dt = v from t = 1 to 0 on each clip's own shifted schedule."""
    x = [n.clone() for n in noise]
    for t_now, _, dt in _steps(steps, reference_tokens, tokens):
        x = [xi + d * vi for xi, vi, d in zip(x, velocity(x, t_now), dt)]
    return x


def heun_sample(velocity: Velocity, noise: Sequence[torch.Tensor], steps: int, reference_tokens: int,
                tokens: Sequence[int]) -> List[torch.Tensor]:
    """Second order: average the velocity at both ends of each step (Euler on the last step, where t = 0)."""
    x = [n.clone() for n in noise]
    for i, (t_now, t_next, dt) in enumerate(_steps(steps, reference_tokens, tokens)):
        v = velocity(x, t_now)
        predicted = [xi + d * vi for xi, vi, d in zip(x, v, dt)]
        if i == steps - 1:
            x = predicted
            continue
        v_next = velocity(predicted, t_next)
        x = [xi + d * 0.5 * (a + b) for xi, a, b, d in zip(x, v, v_next, dt)]
    return x


SAMPLERS = {"euler": euler_sample, "heun": heun_sample}


def guided(velocity_fn, cfg_scale: float):
    """Classifier-free guidance: v = v_uncond + s (v_cond - v_uncond), one batched call for both."""
    def combined(x: List[torch.Tensor], t: torch.Tensor) -> List[torch.Tensor]:
        if cfg_scale == 1.0:
            return velocity_fn(x, t, conditional=True)
        both = velocity_fn(x + x, torch.cat([t, t]), conditional=None)
        cond, uncond = both[:len(x)], both[len(x):]
        return [u + cfg_scale * (c - u) for c, u in zip(cond, uncond)]
    return combined

"""What a run can train (`train.method`), in one place: each method's trained model and its trainer.

The entry point, export and the trainers all build through this registry, so a new method (or architecture)
is added here and nowhere else. Imports are deferred: reading a config should not import DeepSpeed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

from torch import nn

from train.config import METHOD_NAMES


@dataclass(frozen=True)
class Method:
    description: str
    build_model: Callable[..., nn.Module]  # (KinoConfig) -> the trained model, freshly initialised
    trainer: Callable[[], type]  # -> the Trainer subclass that trains it


def _text_to_video_model(cfg) -> nn.Module:
    from models.dit import TextToVideoModel

    return TextToVideoModel(cfg.model)


def _causal_vae(cfg) -> nn.Module:
    from models.vae import CausalVideoVAE

    ae = cfg.model.autoencoder
    return CausalVideoVAE(ae.latent_channels, ae.base_channels, tuple(ae.channel_mult), tuple(ae.temporal_downsample))


def _dit_trainer() -> type:
    from train.trainer import Trainer

    return Trainer


def _vae_trainer() -> type:
    from train.vae_trainer import VAETrainer

    return VAETrainer


METHODS: Dict[str, Method] = {
    "dit": Method("the text-to-video diffusion transformer", _text_to_video_model, _dit_trainer),
    "vae": Method("the built-in causal video VAE (experiment=vae_demo)", _causal_vae, _vae_trainer),
}
assert tuple(METHODS) == METHOD_NAMES, "train/config.py METHOD_NAMES must list the methods registered here"


def method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"train.method={name!r}: must be one of {', '.join(METHODS)}")
    return METHODS[name]


def build_model(cfg) -> nn.Module:
    """The model `cfg.train.method` trains, freshly initialised."""
    return method(cfg.train.method).build_model(cfg)

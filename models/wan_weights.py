"""Wan weights between diffusers' `WanTransformer3DModel` directories and Kino's `model.arch=wan` (models/wan.py).

A diffusers directory holds `config.json` and `diffusion_pytorch_model.safetensors`, or several shards named by
`diffusion_pytorch_model.safetensors.index.json`, text-to-video or image-to-video (Wan 2.1 I2V: 36 input channels,
the image embedder and each block's added key/value projections; FLF2V's image position embedding too). Parameter
names are the same on both sides; two tensors change layout: the patch embedding (a Conv3d there, a Linear over
Kino's patch vectors here) and the output projection (rows in (pt, ph, pw, C) order there, (C, pt, ph, pw) here). `check_matches` compares a directory with a model
config key by key, from the files' headers alone, before any weight is read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from models.config import ModelConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


class WeightsMismatch(ValueError):
    """A directory's weights cannot initialise the configured model (the message lists every difference)."""


def weight_files(directory) -> List[Path]:
    directory = Path(directory)
    index = directory / INDEX
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    if (directory / WEIGHTS).exists():
        return [directory / WEIGHTS]
    raise WeightsMismatch(f"{directory}: no {WEIGHTS} or {INDEX} (a diffusers WanTransformer3DModel directory)")


def read_config(directory) -> Dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise WeightsMismatch(f"{directory}: no config.json (a diffusers WanTransformer3DModel directory)")
    return json.loads(path.read_text())


def input_channels(cfg: ModelConfig) -> int:
    """The patch embedding's input channels: the latents, or with conditioning frames Wan 2.1 I2V's [latents, mask,
    given latents] (36 for 16 latent channels and a temporal factor of 4)."""
    from models.conditioning import input_channels as channels

    return channels(cfg.autoencoder.latent_channels, cfg.frame_conditioning, cfg.autoencoder.temporal_factor)


def diffusers_config(cfg: ModelConfig, text_dim: int) -> Dict:
    """The `config.json` of a WanTransformer3DModel with `cfg`'s architecture. The image branch (model.image): CLIP's
    width in (image_dim), the model's width into each block's added key/value projections (added_kv_proj_dim), and
    for FLF2V the two images' tokens under a position embedding (pos_embed_seq_len)."""
    image = cfg.image
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
            "num_attention_heads": cfg.heads, "attention_head_dim": cfg.dim // cfg.heads,
            "in_channels": input_channels(cfg), "out_channels": cfg.autoencoder.latent_channels,
            "text_dim": text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.mlp_hidden, "num_layers": cfg.depth,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
            "image_dim": image.dim if image.path else None, "added_kv_proj_dim": cfg.dim if image.path else None,
            "rope_max_seq_len": 1024,
            "pos_embed_seq_len": image.images * image.tokens if image.path and image.images == 2 else None}


def config_differences(saved: Dict, cfg: ModelConfig, text_dim: int) -> List[str]:
    expected = diffusers_config(cfg, text_dim)
    differences = []
    for key, value in expected.items():
        if key in ("_class_name", "rope_max_seq_len"):  # RoPE is computed per clip here, at any length
            continue
        have = saved.get(key, value if key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len") else None)
        if isinstance(have, (list, tuple)):
            have = list(have)
        if have != value:
            differences.append(f"{key}: the directory has {have!r}, the config gives {value!r}")
    return differences


def _kino_shape(name: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    if name == "patch_embedding.weight" and len(shape) == 5:
        return (shape[0], shape[1] * shape[2] * shape[3] * shape[4])
    return tuple(shape)


def check_matches(directory, cfg: ModelConfig, text_dim: int) -> None:
    """Raise WeightsMismatch naming every difference between the directory's architecture and `cfg`: the config's
    fields, then each tensor's name and shape (read from the safetensors headers, not the weights)."""
    from safetensors import safe_open

    from models.wan import WanDiT

    problems = config_differences(read_config(directory), cfg, text_dim)
    shapes = {}
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = _kino_shape(name, tuple(handle.get_slice(name).get_shape()))
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in WanDiT(cfg, text_dim).state_dict().items()}
    problems += [f"missing tensor {name} {list(shape)}" for name, shape in expected.items() if name not in shapes]
    problems += [f"unexpected tensor {name}" for name in shapes if name not in expected]
    problems += [f"{name}: shape {list(shapes[name])} in the directory, {list(shape)} in the model"
                 for name, shape in expected.items() if name in shapes and shapes[name] != shape]
    if problems:
        raise WeightsMismatch(f"model.init_from={directory} does not match model.arch=wan as configured:\n  "
                              + "\n  ".join(problems))


def _proj_out_rows(tensor: torch.Tensor, cfg: ModelConfig, to_kino: bool) -> torch.Tensor:
    pt, ph, pw = cfg.patch_size
    c = cfg.autoencoder.latent_channels
    rest = tensor.shape[1:]
    if to_kino:  # (pt, ph, pw, C) -> (C, pt, ph, pw)
        return tensor.reshape(pt, ph, pw, c, *rest).permute(3, 0, 1, 2, *range(4, 4 + len(rest))).reshape(tensor.shape)
    return tensor.reshape(c, pt, ph, pw, *rest).permute(1, 2, 3, 0, *range(4, 4 + len(rest))).reshape(tensor.shape)


def to_kino(state: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name == "patch_embedding.weight":
            tensor = tensor.reshape(tensor.shape[0], -1)
        elif name in ("proj_out.weight", "proj_out.bias"):
            tensor = _proj_out_rows(tensor, cfg, to_kino=True)
        out[name] = tensor
    return out


def to_diffusers(state: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if name == "patch_embedding.weight":
            tensor = tensor.reshape(tensor.shape[0], input_channels(cfg), *cfg.patch_size)
        elif name in ("proj_out.weight", "proj_out.bias"):
            tensor = _proj_out_rows(tensor, cfg, to_kino=False)
        out[name] = tensor.contiguous()
    return out


def load_diffusers(directory, cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """A diffusers directory's weights in Kino's layout (fp32 on the CPU)."""
    from safetensors.torch import load_file

    state = {}
    for path in weight_files(directory):
        state.update(load_file(str(path)))
    return to_kino({name: tensor.float() for name, tensor in state.items()}, cfg)


def save_diffusers(state: Dict[str, torch.Tensor], cfg: ModelConfig, text_dim: int, directory) -> Path:
    """Write a directory `WanTransformer3DModel.from_pretrained` loads, from the DiT's state dict (Kino layout)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(to_diffusers(state, cfg), str(directory / WEIGHTS))
    (directory / "config.json").write_text(json.dumps(diffusers_config(cfg, text_dim), indent=1))
    return directory

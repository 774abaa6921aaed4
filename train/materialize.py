"""Putting the built model's parameters where training keeps them, without whole copies of the model.

Under ZeRO-3 each parameter is partitioned as soon as it has a value, so a rank holds its share of the model plus
one whole tensor at a time, on the host and on its GPU (DeepSpeed's zero.Init does the same inside module
constructors; here the model code stays unaware of it). A fine-tune (`model.init_from`) or a resume builds the
model on the meta device: no weight is initialised only to be overwritten. The base weights are read once, front
to back, by rank 0 under ZeRO-3 (the others receive each tensor in the partitioning broadcast) or by every rank
under ZeRO-0/1/2 (each keeps one whole copy), and rank 0 hashes the bytes as it reads them: the identity recorded
for the run costs no second read.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

from conf.schema import KinoConfig
from train.engine import DistEnv, compute_dtype, deepspeed_config
from train.methods import build_model

log = logging.getLogger("kino")


def deferred(cfg: KinoConfig, fresh: bool) -> bool:
    """Whether the model is built on the meta device: every value comes from somewhere else (the base weights and
    LoRA's starting adapters on a fresh fine-tune; the checkpoint on a resume under ZeRO-3). A built-in caption
    encoder under model.init_from has no base weights: that model is initialised as usual."""
    if cfg.train.method != "dit":
        return False
    if fresh:
        return bool(cfg.model.init_from) and cfg.model.text.name != "builtin"
    return cfg.zero.stage == 3


def build_deferred(cfg: KinoConfig, fresh: bool) -> torch.nn.Module:
    if deferred(cfg, fresh):
        with torch.device("meta"):
            return build_model(cfg)
    return build_model(cfg)


class Placement:
    """Where a parameter's value goes: under ZeRO-3 onto the device, broadcast from rank 0 and partitioned at
    once; otherwise whole on the host, as one copy (the engine moves the model to its device)."""

    def __init__(self, cfg: KinoConfig, env: DistEnv):
        self.partitioned = cfg.zero.stage == 3
        self.dtype = compute_dtype(cfg)
        self.env = env
        self.init = None
        if self.partitioned:
            import deepspeed

            self.init = deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, env.world_size, env.device.type),
                                            dtype=self.dtype)

    @property
    def reads_everywhere(self) -> bool:
        """Whether every rank needs each value (else rank 0's is broadcast)."""
        return not self.partitioned

    def place(self, param: torch.nn.Parameter, value: Optional[torch.Tensor]) -> None:
        shape = tuple(param.shape)
        if not self.partitioned:
            _set(param, value.float().reshape(shape))
            return
        if value is None:  # not rank 0: the broadcast fills it
            value = torch.empty(shape, dtype=self.dtype, device=self.env.device)
        _set(param, value.to(self.env.device, self.dtype).reshape(shape))
        # DeepSpeed's own conversion of one parameter (what zero.Init does to each new one): broadcast from rank 0,
        # keep this rank's partition, free the rest.
        self.init._convert_to_zero_parameters([param])


def _set(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """`param` holds `value` from now on, the same Python object (modules, hooks and partials keep pointing at it);
    a meta parameter cannot take a real tensor as its .data, so its storage is swapped in."""
    if param.is_meta:
        torch.utils.swap_tensors(param, torch.nn.Parameter(value, requires_grad=param.requires_grad))
    else:
        param.data = value


def materialize(model: torch.nn.Module, cfg: KinoConfig, env: DistEnv, fresh: bool) -> Optional[Dict[str, str]]:
    """Give every parameter of `model` its value and place: from model.init_from on a fresh fine-tune, from nothing
    on a resume (the checkpoint restores it next), as built otherwise. Collective. Returns the base model's identity
    {name, path, sha256, license} (None without model.init_from)."""
    m = cfg.model
    placement = Placement(cfg, env)
    on_meta = any(p.is_meta for p in model.parameters())
    identity = base_identity(m) if m.init_from else None
    sha256 = None
    if fresh and m.init_from:
        sha256 = load_base(model, cfg, env, placement, on_meta)
    elif on_meta:
        for p in model.parameters():  # the checkpoint's values replace these
            placement.place(p, torch.zeros(p.shape, dtype=placement.dtype) if env.is_main or
                            placement.reads_everywhere else None)
    elif placement.partitioned:
        for p in model.parameters():
            placement.place(p, p.data if env.is_main else None)
    if not placement.partitioned:
        model.to(env.device)
    if identity is not None:
        identity = share_identity(identity, sha256, m, env)
    return identity


def base_identity(m) -> Dict[str, str]:
    from models.wan_weights import read_config

    saved = read_config(m.init_from)
    return {"name": saved.get("_name_or_path") or Path(m.init_from).resolve().name,
            "path": str(Path(m.init_from).resolve()), "sha256": "", "license": m.init_license}


def load_base(model: torch.nn.Module, cfg: KinoConfig, env: DistEnv, placement: Placement, on_meta: bool) -> Optional[str]:
    """Stream model.init_from into the DiT, one tensor at a time. Returns the files' sha256 on rank 0 (None
    elsewhere). Parameters the files do not hold must be LoRA adapters: they take their starting values."""
    from models.lora import init_adapter, is_adapter
    from models.wan_weights import to_kino
    from models.weights import remember_sha256, stream_safetensors, tensor_order, weight_paths

    m = cfg.model
    paths = weight_paths(m.init_from)
    reads = env.is_main or placement.reads_everywhere
    digest = hashlib.sha256() if env.is_main else None
    params = dict(model.dit.named_parameters())
    stream = stream_safetensors(paths, digest) if reads else None
    for name in tensor_order(paths):
        if name not in params:  # check_matches passed at start-up: the files changed since
            raise ValueError(f"model.init_from={m.init_from}: unexpected tensor {name}")
        param = params.pop(name)
        value = None
        if stream is not None:
            read_name, tensor = next(stream)
            assert read_name == name, (read_name, name)
            value = to_kino({name: tensor}, m)[name].float()
        if on_meta or placement.partitioned:
            placement.place(param, value)
        else:
            with torch.no_grad():
                param.copy_(value)
    if stream is not None:
        for _ in stream:  # drain: the digest covers every byte of every file
            pass
    missing = [name for name in params if not is_adapter(name)]
    if missing:
        raise ValueError(f"model.init_from={m.init_from}: missing {missing[:5]}")
    for name, param in params.items():
        if on_meta:
            value = None
            if reads:
                value = torch.empty(param.shape, dtype=torch.float32)
                init_adapter(name, value)
            placement.place(param, value)
        elif placement.partitioned:
            placement.place(param, param.data if env.is_main else None)
    if not on_meta and placement.partitioned:  # a built-in caption encoder, initialised as built
        for p in model.parameters():
            if not hasattr(p, "ds_id"):
                placement.place(p, p.data if env.is_main else None)
    if digest is None:
        return None
    sha256 = digest.hexdigest()
    remember_sha256(m.init_from, sha256)
    return sha256


def share_identity(identity: Dict[str, str], sha256: Optional[str], m, env: DistEnv) -> Dict[str, str]:
    """Rank 0's hash to every rank; a fresh start hashes while it loads, a resume hashes now (rank 0: the
    checkpoint's recorded identity replaces this one after it loads, train/trainer.py)."""
    from models.weights import weights_sha256

    if env.is_main:
        identity["sha256"] = sha256 or weights_sha256(m.init_from)
    shared = [identity]
    if dist.is_initialized():
        dist.broadcast_object_list(shared, src=0)
    identity = shared[0]
    if m.init_sha256 and m.init_sha256 != identity["sha256"]:
        raise ValueError(f"model.init_from={m.init_from}: its weights hash to {identity['sha256']}, "
                         f"model.init_sha256 pins {m.init_sha256}")
    m.init_sha256 = identity["sha256"]
    if sha256 is not None:
        log.info("base model: %s (sha256 %s, %s) from %s", identity["name"], identity["sha256"][:16],
                 identity["license"], identity["path"])
    return identity

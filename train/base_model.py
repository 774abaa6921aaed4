"""model.init_from: a fine-tune's base weights, loaded into the DiT and identified (name, path, sha256,
license) for config.yaml, every checkpoint and audit.json."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

from models.config import ModelConfig

log = logging.getLogger("kino")


def initialize_from_base(model: torch.nn.Module, m: ModelConfig, is_main: bool, load: bool) -> Optional[Dict[str, str]]:
    """model.init_from: the base weights into the DiT (a fresh start only: a resume reads its checkpoint) and
    their identity {name, path, sha256, license}. Rank 0 hashes the files; every rank gets its answer."""
    if not m.init_from:
        return None
    from models.wan_weights import load_diffusers, read_config
    from models.weights import weights_sha256

    identity = [None]
    if is_main:
        saved = read_config(m.init_from)
        identity = [{"name": saved.get("_name_or_path") or Path(m.init_from).resolve().name,
                     "path": str(Path(m.init_from).resolve()), "sha256": weights_sha256(m.init_from),
                     "license": m.init_license}]
    if dist.is_initialized():
        dist.broadcast_object_list(identity, src=0)
    identity = identity[0]
    if m.init_sha256 and m.init_sha256 != identity["sha256"]:
        raise ValueError(f"model.init_from={m.init_from}: its weights hash to {identity['sha256']}, "
                         f"model.init_sha256 pins {m.init_sha256}")
    m.init_sha256 = identity["sha256"]
    if load:
        missing, unexpected = model.dit.load_state_dict(load_diffusers(m.init_from, m), strict=False)
        missing = [name for name in missing if ".lora_A." not in name and ".lora_B." not in name]
        if missing or unexpected:  # check_matches passed at start-up: the files changed since
            raise ValueError(f"model.init_from={m.init_from}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        log.info("base model: %s (sha256 %s, %s) from %s", identity["name"], identity["sha256"][:16],
                 identity["license"], identity["path"])
    return identity

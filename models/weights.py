"""The identity of a set of weights: one sha256 over the bytes of the files a loader reads, the same for a base
model (model.init_from) and for the frozen encoders a latent cache was built with."""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import List, Tuple

# In the order diffusers' and transformers' from_pretrained prefer them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weight_paths(path) -> List[Path]:
    """The weight files at `path`: the file itself; in a directory, the files its index files name (sharded
    checkpoints), else the top-level files of the first format present. Other files (copies in another format,
    an optimizer state in a subfolder) are not the weights and do not change the identity."""
    path = Path(path)
    if path.is_file():
        return [path]
    names = set()
    for index in sorted(path.glob("*.index.json")):
        names.update(json.loads(index.read_text()).get("weight_map", {}).values())
    if names:
        return sorted(path / name for name in names)
    for suffix in WEIGHT_SUFFIXES:
        files = sorted(p for p in path.glob(f"*{suffix}") if p.is_file())
        if files:
            return files
    return []


def weights_sha256(path) -> str:
    """One sha256 over the bytes of the weight files at `path`, in path order. Remembered per process for files
    of unchanged size and modification time (a run checks several caches built with the same encoders)."""
    stamps = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in weight_paths(path))
    return _digest(stamps)


@functools.lru_cache(maxsize=64)
def _digest(stamps: Tuple[Tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for file, _, _ in stamps:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()

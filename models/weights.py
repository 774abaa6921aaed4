"""The identity of a set of weights: one sha256 over the bytes of its files, the same for a base model
(model.init_from) and for the frozen encoders a latent cache was built with."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import List

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weight_paths(path) -> List[Path]:
    """A weights file itself, or a directory's weight files (any depth) in path order."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weights_sha256(path) -> str:
    """One sha256 over the bytes of the weight files at `path`, in path order."""
    digest = hashlib.sha256()
    for file in weight_paths(path):
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()

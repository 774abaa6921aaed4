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
    stamps = _stamps(path)
    return _remembered.get(stamps) or _digest(stamps)


def _stamps(path) -> Tuple[Tuple[str, int, int], ...]:
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in weight_paths(path))


@functools.lru_cache(maxsize=64)
def _digest(stamps: Tuple[Tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for file, _, _ in stamps:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


# safetensors' dtype names (the header's "dtype") as torch dtypes.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class _Hashed:
    """A file read front to back, every byte also fed to `digest` (None: not hashed)."""

    def __init__(self, handle, digest):
        self.handle, self.digest = handle, digest

    def read(self, n: int) -> bytes:
        data = self.handle.read(n)
        if len(data) != n:
            raise ValueError(f"{self.handle.name}: ends after {len(data)} of {n} bytes (a truncated safetensors file)")
        if self.digest is not None:
            self.digest.update(data)
        return data


def stream_safetensors(paths, digest=None):
    """Yield (name, tensor) from safetensors files, each file read once, front to back, one tensor in memory at a
    time; every byte read goes to `digest` (a hashlib object), so the same pass loads the weights and computes
    `weights_sha256`. Tensors come in the order they lie in the file."""
    import torch

    for path in paths:
        with open(path, "rb") as handle:
            reader = _Hashed(handle, digest)
            position = 0
            for name, entry in safetensors_entries(reader):
                begin, end = entry["data_offsets"]
                if begin > position:  # padding between tensors: read (and hashed) all the same
                    reader.read(begin - position)
                dtype = getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]])
                data = bytearray(reader.read(end - begin))
                tensor = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
                yield name, tensor.reshape(entry["shape"])
                position = end
            rest = handle.read()  # trailing bytes belong to the file's identity too
            if digest is not None:
                digest.update(rest)


def safetensors_entries(reader):
    """(name, header entry) of a safetensors file's tensors, in the order they lie in it, read from its header
    (`reader.read(n)`: the file's first bytes on; nothing after the header is read)."""
    header = json.loads(reader.read(int.from_bytes(reader.read(8), "little")))
    header.pop("__metadata__", None)
    return sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])


def tensor_order(paths) -> List[str]:
    """The tensors' names in the order stream_safetensors yields them, from the headers alone."""
    names = []
    for path in paths:
        with open(path, "rb") as handle:
            names += [name for name, _ in safetensors_entries(handle)]
    return names


def remember_sha256(path, sha256: str) -> None:
    """Record a digest computed while streaming (stream_safetensors), so weights_sha256 does not read again."""
    _remembered[_stamps(path)] = sha256


_remembered: dict = {}

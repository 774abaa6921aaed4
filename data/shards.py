"""Write WebDataset video shards and their manifest; verify them against it."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import webdataset as wds

from data.schema import MANIFEST_NAME, MANIFEST_VERSION, write_manifest
from data.storage import location, make_folder, open_read, staged


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open_read(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ShardSetWriter:
    """Writes samples into numbered tars of at most `samples_per_shard` and records the manifest. Into object
    storage, each tar is written locally and uploaded whole when it closes (one local shard at a time)."""

    def __init__(self, root, prefix: str = "shard", samples_per_shard: int = 16, max_bytes: Optional[int] = None):
        self.root = make_folder(root)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.max_bytes = max_bytes
        self._bytes = 0
        self.rows: List[Dict[str, Any]] = []
        self._writer: Optional[wds.TarWriter] = None
        self._path: Optional[Path] = None
        self._count = 0
        self._licenses: Counter = Counter()

    def write(self, key: str, video: bytes, caption: str, meta: Dict[str, Any], caption_bytes: bytes = None) -> None:
        full = self._count >= self.samples_per_shard or (self.max_bytes and self._bytes + len(video) > self.max_bytes)
        if self._writer is None or (full and self._count):
            self._close_shard()
            self._path = self.root / f"{self.prefix}-{len(self.rows):05d}.tar"
            self._staging = staged(self._path)
            self._local = self._staging.__enter__()
            self._writer = wds.TarWriter(str(self._local))
        self._writer.write({
            "__key__": key,
            "mp4": video,
            "txt": caption_bytes if caption_bytes is not None else caption.encode("utf-8"),
            "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        })
        self._count += 1
        self._bytes += len(video)
        self._licenses[str(meta.get("license") or "<missing>")] += 1

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self.rows.append({
            "path": self._path.name,
            "num_samples": self._count,
            "bytes": self._local.stat().st_size,
            "sha256": sha256_file(self._local),
            "licenses": dict(self._licenses),
        })
        self._staging.__exit__(None, None, None)  # published whole: the local copy goes
        self._writer, self._count, self._bytes, self._licenses = None, 0, 0, Counter()

    def close(self, extra: Optional[Dict[str, Any]] = None, earlier_rows: Sequence[Dict[str, Any]] = ()) -> Path:
        """Write the manifest: `earlier_rows` (shards already in the folder, kept) and this writer's."""
        self._close_shard()
        write_manifest(self.root, {"version": MANIFEST_VERSION, "shards": [*earlier_rows, *self.rows],
                                   **(extra or {})})
        return self.root / MANIFEST_NAME


def verify_shards(root) -> List[str]:
    """Problems found comparing shards with the manifest (sizes, hashes); empty when all match."""
    from data.schema import read_manifest

    root = location(root)
    problems = []
    for row in read_manifest(root)["shards"]:
        path = root / row["path"]
        if not path.exists():
            problems.append(f"{row['path']}: missing")
            continue
        size = path.stat().st_size
        if size != row["bytes"]:
            problems.append(f"{row['path']}: {size} bytes, manifest says {row['bytes']}")
        elif sha256_file(path) != row["sha256"]:
            problems.append(f"{row['path']}: sha256 differs from the manifest")
    return problems

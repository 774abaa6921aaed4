"""Read-only views of a dataset (verify, inspect) and of a run's audit (takedown queries)."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

import webdataset as wds

from data.schema import metadata_problems, parse_metadata, read_manifest
from data.shards import verify_shards


def probe_with_decord(video: bytes) -> int:
    """Decode the first and last frame; returns the frame count (raises on a broken video)."""
    import decord

    reader = decord.VideoReader(io.BytesIO(video), num_threads=1)
    count = len(reader)
    if count == 0:
        raise ValueError("no frames")
    try:
        reader.get_batch([0, count - 1])
    except decord.DECORDError as error:
        if "DECORDArrayCopyFromTo" not in str(error):  # decord's width bug: the stream itself is fine
            raise
    return count


def scan(root) -> Dict[str, Any]:
    """Every sample of every shard: counts per license, shapes, durations, and what is broken."""
    root = Path(root)
    manifest = read_manifest(root)
    licenses, resolutions, durations = Counter(), Counter(), Counter()
    corrupt: List[Dict[str, str]] = []
    samples = 0
    for row in manifest["shards"]:
        seen = 0
        errors: List[str] = []
        for sample in wds.tarfile_samples([{"url": str(root / row["path"])}],
                                          handler=lambda e: errors.append(f"{type(e).__name__}: {e}") or False):
            seen += 1
            key = sample.get("__key__", "?")
            try:
                meta = parse_metadata(sample["json"])
            except Exception as error:
                corrupt.append({"shard": row["path"], "key": key, "kind": "INVALID", "problem": f"metadata: {error}"})
                continue
            licenses[str(meta.get("license") or "<missing>")] += 1
            invalid = metadata_problems(meta)
            if invalid:
                corrupt.append({"shard": row["path"], "key": key, "kind": "INVALID", "problem": "; ".join(invalid)})
            broken = None
            if "mp4" not in sample:
                broken = "no mp4"
            else:
                try:
                    probe_with_decord(sample["mp4"])
                except Exception as error:
                    broken = f"video: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
            if broken:
                corrupt.append({"shard": row["path"], "key": key, "kind": "CORRUPT", "problem": broken})
            if invalid or broken:
                continue
            resolutions[f"{meta['width']}x{meta['height']}"] += 1
            seconds = meta["num_frames"] / meta["fps"]
            durations[f"{int(seconds)}-{int(seconds) + 1}s"] += 1
        samples += seen
        if errors:
            corrupt.append({"shard": row["path"], "key": "*", "kind": "CORRUPT", "problem": f"tar: {errors[0][:120]}"})
        if seen != row["num_samples"]:
            corrupt.append({"shard": row["path"], "key": "*", "kind": "CORRUPT",
                            "problem": f"{seen} samples, manifest says {row['num_samples']}"})
    return {"samples": samples, "licenses": licenses, "resolutions": resolutions, "durations": durations,
            "corrupt": corrupt, "manifest_problems": verify_shards(root)}


def checkpoint_audits(run_dir) -> List[Dict[str, Any]]:
    """audit.json of every complete checkpoint of a run (earlier runs moved to previous/ included)."""
    run_dir = Path(run_dir)
    found = []
    for complete in sorted(run_dir.glob("**/checkpoints/step_*/COMPLETE")):
        audit = json.loads((complete.parent / "audit.json").read_text())
        audit["checkpoint"] = str(complete.parent.relative_to(run_dir))
        found.append(audit)
    return sorted(found, key=lambda a: (a["checkpoint"].startswith("previous"), a["step"]))


def takedown(run_dir, rights_holder: Optional[str] = None, source: Optional[str] = None) -> List[Dict[str, Any]]:
    """Checkpoints that trained on samples of a rights holder or from a source, with counts per shard."""
    hits = []
    for audit in checkpoint_audits(run_dir):
        matched: Dict[str, int] = {}
        for field, wanted in (("rights_holders", rights_holder), ("sources", source)):
            if wanted is None:
                continue
            for shard, counts in audit.get(field, {}).items():
                for name, count in counts.items():
                    if name == wanted:
                        matched[shard] = matched.get(shard, 0) + count
        if matched:
            hits.append({"checkpoint": audit["checkpoint"], "step": audit["step"], "samples": sum(matched.values()),
                         "shards": matched})
    return hits

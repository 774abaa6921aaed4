"""Read-only views of a dataset (verify, inspect) and of a run's audit (takedown queries)."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

from data.progress import Progress
from data.schema import metadata_problems, read_manifest
from data.shards import verify_shards
from data.storage import location


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


def scan(root, progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Every sample of every shard: counts per license, shapes, durations, and what is broken. A break in a tar
    (corrupt or truncated data, a repeated key or member: data/tar_samples.py) is one problem, with its offset;
    the samples around it are still read and counted."""
    from data.tar_samples import TarBreak, decode_sample, read_tar

    root = location(root)
    manifest = read_manifest(root)
    licenses, resolutions, durations = Counter(), Counter(), Counter()
    corrupt: List[Dict[str, str]] = []
    samples = good = 0
    total = max(1, sum(int(row["num_samples"]) for row in manifest["shards"]))
    for row in manifest["shards"]:
        path = root / row["path"]
        if not path.exists():
            continue  # verify_shards reports it
        seen = 0
        for item in read_tar(path):
            if isinstance(item, TarBreak):
                corrupt.append({"shard": row["path"], "key": item.key or f"@{item.offset}", "kind": "CORRUPT",
                                "problem": f"tar: {item.reason} (byte {item.offset})"})
                continue
            seen += 1
            if progress is not None:
                progress.fraction = min(1.0, (samples + seen) / total)
                progress.update(samples + seen, f"{len(corrupt)} problem(s)")
            key = item.key
            video, _, meta, problems = decode_sample(item)
            if problems:
                corrupt.append({"shard": row["path"], "key": key, "kind": "INVALID", "problem": "; ".join(problems)})
                if "json" not in item.members or any(p.startswith("metadata") for p in problems) or video is None:
                    continue
            licenses[str(meta.get("license") or "<missing>")] += 1
            invalid = metadata_problems(meta)
            if invalid:
                corrupt.append({"shard": row["path"], "key": key, "kind": "INVALID", "problem": "; ".join(invalid)})
            broken = None
            try:
                frames = probe_with_decord(video)
                claimed = meta.get("num_frames")
                if isinstance(claimed, (int, float)) and frames < claimed:
                    broken = f"video has {frames} frames, its metadata claims {claimed}"
            except Exception as error:
                broken = f"video: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
            if broken:
                corrupt.append({"shard": row["path"], "key": key, "kind": "CORRUPT", "problem": broken})
            if invalid or broken or problems:
                continue
            good += 1
            resolutions[f"{meta['width']}x{meta['height']}"] += 1
            seconds = meta["num_frames"] / meta["fps"]
            durations[f"{int(seconds)}-{int(seconds) + 1}s"] += 1
        samples += seen
        if seen != row["num_samples"]:
            corrupt.append({"shard": row["path"], "key": "*", "kind": "CORRUPT",
                            "problem": f"{seen} samples, manifest says {row['num_samples']}"})
    return {"samples": samples, "good": good, "licenses": licenses, "resolutions": resolutions,
            "durations": durations, "corrupt": corrupt, "manifest_problems": verify_shards(root)}


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

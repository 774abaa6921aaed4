"""`python -m data takedown`: remove a rights holder's samples (or a source's, or listed keys) from video datasets.

Each affected shard is rewritten without them (the other samples' bytes unchanged, in order) and its manifest row
updated; a shard left empty is deleted. The manifest keeps a history of takedowns. A report, written into each
dataset's `takedowns/` folder, lists every removed sample, every rewritten file with its sha256 before and after,
the time, and the checkpoints of the given runs that had trained on the removed samples. A run started afterwards
never sees them; a run resumed afterwards refuses a dataset whose shards changed under its checkpoint unless
`data.allow_changed_dataset=true` (train/data_plane.py).
"""
from __future__ import annotations

import json
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from conf.errors import UserError, did_you_mean
from data.schema import read_manifest, write_manifest
from data.shards import sha256_file
from data.storage import join, location, remove, staged, write_text
from data.tar_samples import TarSample, add_sample, decode_sample, read_tar


class Criteria:
    def __init__(self, rights_holder: Optional[str] = None, source: Optional[str] = None,
                 keys: Optional[Set[str]] = None):
        if sum(x is not None for x in (rights_holder, source, keys)) != 1:
            raise ValueError("a takedown names exactly one of: a rights holder, a source URL, a keys file")
        self.rights_holder, self.source, self.keys = rights_holder, source, keys

    def matches(self, key: str, meta: Dict[str, Any]) -> bool:
        if self.keys is not None:
            return key in self.keys
        if self.rights_holder is not None:
            return meta.get("rights_holder") == self.rights_holder
        return meta.get("source_url") == self.source

    def field(self) -> Optional[str]:
        """The metadata field a rights holder or source criterion compares (None for keys)."""
        if self.keys is not None:
            return None
        return "rights_holder" if self.rights_holder is not None else "source_url"

    def nothing_matched(self, seen: Set[str]) -> str:
        """Why a takedown that matched no sample is refused, with the nearest value the datasets hold."""
        if self.keys is not None:
            return f"none of the {len(self.keys)} keys listed is a sample of these datasets: nothing to remove"
        wanted = self.rights_holder if self.rights_holder is not None else self.source
        flag = "--rights-holder" if self.rights_holder is not None else "--source"
        return f"{flag} {wanted!r} matches no sample of these datasets{did_you_mean(wanted, seen)}: nothing to remove"

    def describe(self) -> Dict[str, Any]:
        if self.keys is not None:
            return {"keys": sorted(self.keys)}
        return {"rights_holder": self.rights_holder} if self.rights_holder is not None else {"source": self.source}


def _write_tar(path, samples: Sequence[TarSample]) -> Tuple[int, str]:
    """Replace `path` with a tar of `samples`; its size and sha256, taken from the local copy before it is
    published (an object in storage is not read back)."""
    with staged(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                add_sample(tar, sample.key, sample.members)
        return tmp.stat().st_size, sha256_file(tmp)


def _license_counts(samples: Sequence[TarSample]) -> Dict[str, int]:
    counts = Counter()
    for sample in samples:
        counts[str(decode_sample(sample)[2].get("license") or "<missing>")] += 1
    return dict(counts)


def remove_from_dataset(root, criteria: Criteria, dry_run: bool, when: str) -> Dict[str, Any]:
    """Rewrite one dataset without the matching samples; what was removed and each file's hashes."""
    root = location(root)
    manifest = read_manifest(root)
    removed: List[Dict[str, Any]] = []
    files: List[Dict[str, Any]] = []
    seen: Set[str] = set()  # the values of the criterion's field, for a hint when nothing matches
    rows = []
    for row in manifest["shards"]:
        path = root / row["path"]
        samples = [item for item in read_tar(path) if isinstance(item, TarSample)]
        kept, hits = [], []
        for sample in samples:
            meta = decode_sample(sample)[2]
            if criteria.field() and meta.get(criteria.field()):
                seen.add(str(meta[criteria.field()]))
            (hits if criteria.matches(sample.key, meta) else kept).append((sample, meta))
        if not hits:
            rows.append(row)
            continue
        before = sha256_file(path)
        for sample, meta in hits:
            removed.append({"dataset": str(root), "shard": row["path"], "key": sample.key,
                            "rights_holder": meta.get("rights_holder"), "source_url": meta.get("source_url"),
                            "license": meta.get("license")})
        after = None
        if not dry_run:
            if kept:
                size, after = _write_tar(path, [s for s, _ in kept])
                rows.append(dict(row, num_samples=len(kept), bytes=size, sha256=after,
                                 licenses=_license_counts([s for s, _ in kept if "drop" not in s.members])))
                if "encoded" in row:  # a latent cache's shard: samples that hold latents (the rest are stubs)
                    rows[-1]["encoded"] = sum("latent.npy" in s.members for s, _ in kept)
            else:
                remove(path)  # nothing left in it: the file and its manifest row go
        else:
            rows.append(row)
        files.append({"dataset": str(root), "path": row["path"], "sha256_before": before, "sha256_after": after,
                      "samples_before": len(samples), "samples_after": len(kept),
                      "deleted": not dry_run and not kept})
    if removed and not dry_run:
        manifest["shards"] = rows
        manifest.setdefault("takedowns", []).append({"at": when, **criteria.describe(), "removed": len(removed)})
        if "cache" in manifest:  # a latent cache: its drop record loses the removed samples too
            gone = {item["key"] for item in removed}
            cache = manifest["cache"]
            cache["dropped_keys"] = {reason: [k for k in keys if k not in gone]
                                     for reason, keys in cache.get("dropped_keys", {}).items()}
            cache["dropped"] = {reason: len(keys) for reason, keys in cache["dropped_keys"].items() if keys}
            cache["dropped_keys"] = {reason: keys for reason, keys in cache["dropped_keys"].items() if keys}
        write_manifest(root, manifest)
    return {"removed": removed, "files": files, "seen": seen}


def follow_sources(datasets: Sequence[Path], before: Dict[str, str]) -> None:
    """A latent cache taken down together with the videos it was encoded from is still a cache of them: its
    recorded source fingerprint becomes theirs after the takedown (training checks it, data/latent_cache.py)."""
    from data.loader import dataset_fingerprint

    after = {str(root): dataset_fingerprint(root) for root in datasets}
    renamed = {before[root]: after[root] for root in before if before[root] != after[root]}
    for root in datasets:
        manifest = read_manifest(root)
        cache = manifest.get("cache")
        if cache is None or cache.get("source_fingerprint") not in renamed:
            continue
        cache["source_fingerprint"] = renamed[cache["source_fingerprint"]]
        write_manifest(root, manifest)


def checkpoints_that_trained_on(run_dir, criteria: Criteria, removed_keys: Set[str]) -> List[Dict[str, Any]]:
    """Checkpoints of a run that had trained on the removed samples: by rights holder or source from each
    checkpoint's audit; for listed keys, from the run's provenance (every trained key per step)."""
    from data.inspect import checkpoint_audits, takedown as audit_query

    if criteria.keys is None:
        return audit_query(run_dir, criteria.rights_holder, criteria.source)
    first = None
    for path in sorted((Path(run_dir) / "provenance").glob("rank_*.jsonl")):  # RUN/provenance, every rank
        for line in path.read_text().splitlines():
            record = json.loads(line) if line.strip() else None
            if record and removed_keys & set(record["keys"]):
                first = record["step"] if first is None else min(first, record["step"])
    if first is None:
        return []
    return [{"checkpoint": a["checkpoint"], "step": a["step"]} for a in checkpoint_audits(run_dir)
            if a["step"] >= first]


def takedown(datasets: Sequence[Path], criteria: Criteria, runs: Sequence[Path] = (), dry_run: bool = False
             ) -> Dict[str, Any]:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report: Dict[str, Any] = {"at": when, "dry_run": dry_run, "criteria": criteria.describe(), "removed": [],
                              "files": [], "checkpoints": {}}
    from data.loader import dataset_fingerprint

    before = {str(root): dataset_fingerprint(root) for root in datasets}
    seen: Set[str] = set()
    for root in datasets:
        part = remove_from_dataset(root, criteria, dry_run, when)
        report["removed"] += part["removed"]
        report["files"] += part["files"]
        seen |= part["seen"]
    if not report["removed"]:  # nothing was changed: most often a misspelt name, which must not pass as done
        raise UserError(criteria.nothing_matched(seen))
    if not dry_run:
        follow_sources(datasets, before)
    keys = {item["key"] for item in report["removed"]}
    for run in runs:
        report["checkpoints"][str(run)] = checkpoints_that_trained_on(run, criteria, keys)
    if not dry_run:
        stamp = when.replace(":", "").replace("-", "")
        for root in datasets:
            write_text(join(root, "takedowns", f"takedown-{stamp}.json"), json.dumps(report, indent=1))
    return report

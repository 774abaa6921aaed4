"""The video shard sample contract (docs/data.md) and the manifest format.

A sample is `KEY.mp4` + `KEY.txt` (caption) + `KEY.json` (metadata). Compatible
with video2dataset output; extra json fields are kept.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from conf.errors import UserError

REQUIRED_FIELDS = ("license", "source_url", "attribution", "rights_holder", "width", "height", "fps", "num_frames")
POSITIVE_NUMBER_FIELDS = ("width", "height", "fps", "num_frames")
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1  # the shards listed inline
SPLIT_VERSION = 2  # a header, and the shards in a Parquet table beside it (large datasets: write_manifest)
SPLIT_ABOVE = 10_000  # shards; a 10,000-shard inline manifest is about 1.7 MB of JSON
SPLIT_ONLY_KEYS = ("shard_table", "num_shards", "num_samples", "shards_fingerprint")
TABLE_COLUMNS = ("path", "num_samples")  # a split table's own columns; each row's other fields are its `row` JSON
# Fields of the contract beside the required ones, and the columns ingest reads for a row's file, caption and key.
OPTIONAL_FIELDS = ("clip_span", "source_clip_span", "aesthetic")
ROW_FIELDS = ("video", "caption", "key")


class NotADataset(UserError, FileNotFoundError):
    """A folder given as a dataset holds no manifest."""


def metadata_problems(meta: Dict[str, Any]) -> List[str]:
    """What is wrong with a sample's metadata, as short reasons; empty if it is valid."""
    problems = [f"missing {name}" for name in REQUIRED_FIELDS if meta.get(name) in (None, "")]
    for name in POSITIVE_NUMBER_FIELDS:
        value = meta.get(name)
        if value not in (None, "") and (not isinstance(value, (int, float)) or value <= 0):
            problems.append(f"{name} is not a positive number")
    return problems


def parse_metadata(raw: bytes) -> Dict[str, Any]:
    meta = json.loads(raw.decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    return meta


def read_manifest(root) -> Dict[str, Any]:
    """The whole manifest, `shards` as a list of row dicts, whichever form it is stored in (for the tools that go
    through every shard: verify, inspect, takedown, encode, ingest --append). Training reads only the columns it
    needs (`shard_plan`, `manifest_fingerprint`)."""
    def rows(manifest):
        if manifest["version"] != SPLIT_VERSION:
            return manifest["shards"]
        table = _read_table(root, manifest, None)
        return [{"path": path, "num_samples": count, **json.loads(rest)} for path, count, rest in
                zip(table.column("path").to_pylist(), table.column("num_samples").to_pylist(),
                    table.column("row").to_pylist())]

    manifest, shards = _with_header(root, rows)
    return {**manifest, "shards": shards}


def _with_header(root, read):
    """(header, read(header)): read again from a fresh header when the table it named is gone (a rewrite replaced
    it between the two reads), so a reader sees the old manifest or the new one."""
    for attempt in range(3):
        header = read_manifest_header(root)
        try:
            return header, read(header)
        except FileNotFoundError:
            if attempt == 2 or header["version"] != SPLIT_VERSION:
                raise


def read_manifest_header(root) -> Dict[str, Any]:
    """manifest.json as stored: a split manifest's header names its shard table instead of listing the shards."""
    from data.storage import location

    path = location(root) / MANIFEST_NAME
    if not path.exists():
        raise NotADataset(f"no {MANIFEST_NAME} in {root}: not a dataset (build one with `python -m data ingest`, "
                                f"or the demo's with `python -m data.demo_set {root}`)")
    manifest = json.loads(path.read_text())
    if manifest.get("version") not in (MANIFEST_VERSION, SPLIT_VERSION):
        raise ValueError(f"{path}: manifest version {manifest.get('version')} is neither {MANIFEST_VERSION} "
                         f"(shards inline) nor {SPLIT_VERSION} (a shard table beside it)")
    return manifest


def shard_plan(root) -> Tuple[List[str], List[int]]:
    """Every shard's name and sample count (what a run's plan is dealt from), read without the rest of the rows where
    the form allows: from a split manifest's Parquet table two columns, a 1M-shard dataset in well under a second."""
    def read(manifest):
        if manifest["version"] != SPLIT_VERSION:
            rows = manifest["shards"]
            return [row["path"] for row in rows], [int(row["num_samples"]) for row in rows]
        table = _read_table(root, manifest, list(TABLE_COLUMNS))
        return table.column("path").to_pylist(), table.column("num_samples").to_pylist()

    return _with_header(root, read)[1]


def manifest_fingerprint(root) -> str:
    """`shards_fingerprint` of a dataset: from a split manifest's header, or from the inline rows (one read)."""
    header = read_manifest_header(root)
    if header["version"] == SPLIT_VERSION:
        return header["shards_fingerprint"]
    rows = header["shards"]
    return shards_fingerprint([r["path"] for r in rows], [r["num_samples"] for r in rows],
                              [r.get("sha256") for r in rows])


def shards_fingerprint(paths: Sequence[str], counts: Sequence[int], hashes: Sequence[Optional[str]]) -> str:
    """sha256 over the shards (name, sample count, file sha256), in name order: changes when any shard does, and
    is the same whichever form the manifest is stored in."""
    rows = sorted((str(p), int(n), h) for p, n, h in zip(paths, counts, hashes))
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def write_manifest(root, manifest: Dict[str, Any], split_above: Optional[int] = None) -> None:
    """Replace a dataset's manifest atomically: a reader sees the old one or the new one, never part of either.
    Up to `split_above` shards (SPLIT_ABOVE) they are listed inline (version 1, readable by eye); above, they go
    to a Parquet table named by its content (columns path, num_samples, and every other field of the row as JSON),
    written first, and manifest.json (version 2) is a small header that names it; the table it replaced is removed
    after."""
    from data.storage import location, remove, staged, write_text

    # a split manifest's own header fields are made anew; an inline one's top-level fields are all the user's
    stale = SPLIT_ONLY_KEYS if manifest.get("version") == SPLIT_VERSION else ()
    header = {k: v for k, v in manifest.items() if k not in stale}
    rows = header.pop("shards")
    limit = SPLIT_ABOVE if split_above is None else split_above
    previous = _current_table(root)
    if len(rows) <= limit:
        write_text(location(root) / MANIFEST_NAME, json.dumps({**header, "version": MANIFEST_VERSION, "shards": rows},
                                                             indent=1, sort_keys=True))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        paths, counts = [str(r["path"]) for r in rows], [int(r["num_samples"]) for r in rows]
        rest = [json.dumps({k: v for k, v in r.items() if k not in TABLE_COLUMNS}, sort_keys=True) for r in rows]
        fingerprint = shards_fingerprint(paths, counts, [r.get("sha256") for r in rows])
        table_name = f"shards-{fingerprint[:16]}.parquet"
        with staged(location(root) / table_name) as tmp:
            pq.write_table(pa.table({"path": paths, "num_samples": counts, "row": rest}), tmp, compression="zstd")
        write_text(location(root) / MANIFEST_NAME, json.dumps(
            {**header, "version": SPLIT_VERSION, "shard_table": table_name, "num_shards": len(rows),
             "num_samples": sum(counts), "shards_fingerprint": fingerprint}, indent=1, sort_keys=True))
        if previous == table_name:
            previous = None
    if previous is not None:  # a reader that read the old header now finds its table gone, and reads again
        remove(location(root) / previous, missing_ok=True)


def _current_table(root) -> Optional[str]:
    try:
        header = read_manifest_header(root)
    except (NotADataset, ValueError):
        return None
    return header.get("shard_table")


def _read_table(root, manifest: Dict[str, Any], columns: Optional[List[str]]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.storage import location, open_read

    # Arrow is handed its own copy of the file, never a Python object: its pool threads may drop their last
    # reference to what they read while the interpreter finalizes, and releasing a Python object there needs the
    # GIL, so the thread is made to exit and the process aborts ("terminate called without an active exception",
    # exit -6, after a `python -m data inspect` that had done its work; apache/arrow#50482, #34314).
    copy = pa.BufferOutputStream()
    with open_read(location(root) / manifest["shard_table"]) as stream:
        copy.write(stream.read())
    return pq.read_table(pa.BufferReader(copy.getvalue()), columns=columns)

"""Ingest licensed videos into shards: from a folder + metadata table, or from video2dataset output.

Nothing in the input crashes it and nothing is lost silently: every row or tar break that is not written lands in
ingest_report.json with its key (or tar offset) and reason, and the manifest and report are written even if the
ingest stops on an error of its own."""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from conf.errors import UserError, did_you_mean
from data.schema import (MANIFEST_NAME, OPTIONAL_FIELDS, REQUIRED_FIELDS, ROW_FIELDS, SPLIT_ONLY_KEYS,
                         metadata_problems, read_manifest)
from data.progress import Progress
from data.shards import ShardSetWriter
from data.storage import location, open_read, remove, write_text

# What a table must give for any row to be written; the rest (width, height, fps, num_frames) can be probed.
TABLE_FIELDS = ("video", "caption", "license", "source_url", "attribution", "rights_holder")
REPORT_NAME = "ingest_report.json"


def parse_mapping(items: Sequence[str]) -> Dict[str, str]:
    """--map FIELD=SOURCE items; a FIELD outside the sample contract is refused, never ignored."""
    fields = (*ROW_FIELDS, *REQUIRED_FIELDS, *OPTIONAL_FIELDS)
    mapping = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise UserError(f"--map {item}: write FIELD=SOURCE, e.g. --map license=license_id")
        if name not in fields:
            raise UserError(f"--map {item}: {name!r} is not a field of the sample contract"
                            f"{did_you_mean(name, fields)}; the fields: {', '.join(fields)}")
        mapping[name] = source
    return mapping


def read_table(path: Path) -> List[Dict[str, Any]]:
    """Rows of a CSV, JSONL or Parquet metadata table."""
    if not path.is_file():
        raise UserError(f"--metadata {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"--metadata {path}: line {number} is not JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"--metadata {path}: line {number} is not a JSON object")
            rows.append(row)
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(str(path)).to_pylist()  # a path: Arrow opens the file itself (data/schema.py _read_table)
    raise UserError(f"--metadata {path}: a metadata table must be .csv, .jsonl or .parquet")


def check_table(records: List[Dict[str, Any]], mapping: Dict[str, str], path: Path) -> None:
    """Refuse a table from which no row could be written: no rows, or a field every row lacks (most often a
    column under another name, which would otherwise reject every row one by one)."""
    if not records:
        raise UserError(f"--metadata {path}: the table has no rows")
    missing = [name for name in TABLE_FIELDS
               if all(_lookup(record, mapping.get(name, name)) in (None, "") for record in records)]
    if missing:
        columns = sorted({str(key) for record in records[:1000] for key in record})
        named = ", ".join(f"{name} (from {mapping[name]!r})" if name in mapping else name for name in missing)
        raise UserError(f"--metadata {path}: no row has {named}; its columns are {', '.join(columns)}: rename "
                        f"them, or name them with --map FIELD=COLUMN")


def _lookup(record: Dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value) if "." in value else int(value)
        except ValueError:
            return value
    return value


def _span(value: Any) -> Optional[Tuple[float, float]]:
    if value in (None, ""):
        return None
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [float(v) for v in value.split(",")]
    start, end = float(value[0]), float(value[1])
    if not 0 <= start < end:
        raise ValueError(f"clip_span {value} is not [start, end) with 0 <= start < end")
    return start, end


def probe(video: bytes) -> Dict[str, Any]:
    """Width, height, fps and frame count of encoded video bytes. Frames are counted from the packets the file
    holds, not the count its header declares, so a cut-short file shows as short."""
    import av

    with av.open(io.BytesIO(video)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for packet in container.demux(stream) if packet.size)
        return {"width": stream.codec_context.width, "height": stream.codec_context.height,
                "fps": float(stream.average_rate or 0), "num_frames": int(frames)}


def cut(video: bytes, start: float, end: float) -> Tuple[bytes, Dict[str, Any]]:
    """Re-encode the [start, end) seconds of a video as mp4; returns the bytes and their probe."""
    from data.video_io import encode_mp4, read_video
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".video") as handle:
        handle.write(video)
        handle.flush()
        frames, fps = read_video(handle.name)
    first, last = int(round(start * fps)), min(len(frames), int(round(end * fps)))
    if last - first < 1:
        raise ValueError(f"clip_span [{start}, {end}) holds no frame of a {len(frames) / fps:.2f}s video")
    clip = frames[first:last]
    clip = clip[:, : clip.shape[1] // 2 * 2, : clip.shape[2] // 2 * 2]  # yuv420p needs even sides
    data = encode_mp4(clip, fps)
    return data, {"width": clip.shape[2], "height": clip.shape[1], "fps": fps, "num_frames": len(clip)}


@dataclass
class Output:
    """Where an ingest writes: a new dataset, or a new shard set beside an existing one's (--append)."""

    root: Path
    prefix: str = "shard"
    earlier_rows: List[Dict[str, Any]] = field(default_factory=list)  # the existing shards, kept as they are
    earlier_keys: Set[str] = field(default_factory=set)
    extra: Dict[str, Any] = field(default_factory=dict)  # the manifest's other fields
    report: str = REPORT_NAME


def prepare_output(out: Path, append: bool = False, force: bool = False) -> Output:
    """Check --out before anything is read or written: an existing dataset is refused unless --append (a new shard
    set beside the old, one manifest) or --force (replaced); a folder holding anything else is never written."""
    if append and force:
        raise UserError("--append and --force: give one (add to the dataset, or replace it)")
    manifest_path = out / MANIFEST_NAME
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if manifest_path.exists():
        manifest = read_manifest(out)
        shards = manifest["shards"]
        held = f"{sum(int(r['num_samples']) for r in shards)} samples in {len(shards)} shards"
        if not (append or force):
            raise UserError(f"--out {out} already holds a dataset ({held}): give a new folder, --append to add "
                            f"these videos to it as a new shard set, or --force to replace it")
        if force:
            remove(manifest_path)  # first: a replacement cut short is no dataset, never a mix of the two
            table = [manifest["shard_table"]] if "shard_table" in manifest else []  # a split manifest's
            for name in [row["path"] for row in shards] + table:
                remove(out / name, missing_ok=True)
            for report in out.glob("ingest_report*.json"):
                remove(report)
            return Output(out)
        extra = {k: v for k, v in manifest.items() if k not in ("version", "shards", *SPLIT_ONLY_KEYS)}
        number = len(extra.get("appended", [])) + 1
        return Output(out, prefix=f"shard-a{number}", earlier_rows=list(shards), earlier_keys=_keys(out, shards),
                      extra=extra, report=f"ingest_report-a{number}.json")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is a folder with other files in it and no dataset: give a new or empty folder")
    return Output(out)


def _keys(root: Path, rows: List[Dict[str, Any]]) -> Set[str]:
    """The sample keys of a dataset's shards, from the tars' member names (no video read)."""
    import tarfile

    keys = set()
    for row in rows:
        with open_read(root / row["path"]) as stream, tarfile.open(fileobj=stream) as tar:
            keys.update(name.rsplit(".", 1)[0] for name in tar.getnames())
    return keys


def ingest_rows(rows: Iterator[Tuple], out, samples_per_shard: int, shard_bytes: Optional[int],
                progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Validate each (key, video bytes, caption, metadata[, problems found reading it]) row and write the accepted
    ones. A row whose key is only a tar offset (a break in a tar) is reported as it is. `out`: an Output
    (prepare_output), or a folder for a new dataset."""
    target = out if isinstance(out, Output) else Output(location(out))
    out = target.root
    writer = ShardSetWriter(out, prefix=target.prefix, samples_per_shard=samples_per_shard, max_bytes=shard_bytes)
    progress = progress or Progress("ingest", unit="rows")
    accepted, rejected, keys, aborted = 0, [], set(), None
    try:
        for row in rows:
            key, video, caption, meta = row[:4]
            problems = list(row[4]) if len(row) > 4 else []
            if key in keys:
                problems.append(f"duplicate key: an earlier row has {key!r}; the first is kept")
            elif key in target.earlier_keys:
                problems.append(f"duplicate key: the dataset already holds {key!r}; it is kept")
            if not problems:
                problems = _check_row(video, caption, meta)
            if problems:
                rejected.append({"key": key, "reasons": problems})
            else:
                writer.write(key, video, caption, meta)
                keys.add(key)
                accepted += 1
            progress.update(accepted + len(rejected), f"{accepted} written, {len(rejected)} rejected")
    except Exception as error:  # a fault of ingest itself: what was written so far is still recorded
        aborted = f"{type(error).__name__}: {error}"
    extra = dict(target.extra) or {"name": out.name, "builder": "data.ingest"}
    if target.earlier_rows:
        extra["appended"] = [*extra.get("appended", []), {"prefix": target.prefix, "samples": accepted,
                                                          "report": target.report,
                                                          "time": time.strftime("%Y-%m-%dT%H:%M:%S")}]
    manifest = writer.close(extra, earlier_rows=target.earlier_rows)
    report = {"accepted": accepted, "rejected": len(rejected), "rejections": rejected, "manifest": str(manifest)}
    if aborted:
        report["aborted"] = aborted
    write_text(out / target.report, json.dumps(report, indent=1))
    report["report"] = str(out / target.report)
    if aborted:
        raise RuntimeError(f"ingest stopped: {aborted} ({accepted} samples written and recorded in "
                           f"{manifest}; see ingest_report.json)")
    return report


def _check_row(video: Optional[bytes], caption: Any, meta: Dict[str, Any]) -> List[str]:
    """Why a row may not be written (empty when it may); `meta` gains what probing the video measured."""
    problems = []
    if video is None:
        problems.append("video file missing")
    span = None
    try:
        span = _span(meta.pop("clip_span", None))
    except (ValueError, TypeError, IndexError) as error:
        problems.append(f"bad clip_span: {error}")
    if not problems:
        try:
            if span is not None:
                video, probed = cut(video, *span)
                meta["source_clip_span"] = list(span)  # done: a re-ingest of these shards must not cut it again
                meta.update(probed)
            else:
                probed = probe(video)
                claimed = meta.get("num_frames")
                if isinstance(claimed, (int, float)) and probed["num_frames"] < claimed:
                    problems.append(f"video is shorter than its metadata claims: {probed['num_frames']} frames, "
                                    f"num_frames says {claimed}")
                for name, value in probed.items():
                    meta.setdefault(name, value)
        except Exception as error:  # undecodable input is reported, never written
            problems.append(f"video unreadable: {type(error).__name__}: {str(error)[:120]}")
    problems += metadata_problems(meta)
    if not isinstance(caption, str) or not caption.strip():
        problems.append("missing caption")
    return problems


def rows_from_table(videos: Path, records: List[Dict[str, Any]], mapping: Dict[str, str],
                    progress: Optional[Progress] = None) -> Iterator[Tuple]:
    """Rows of a metadata table (read_table, check_table) whose `video` column names a file under `videos`."""
    for n, record in enumerate(records):
        if progress is not None:
            progress.fraction = n / len(records) if n else None  # of the rows before this one
        get = lambda field: _lookup(record, mapping.get(field, field))  # noqa: E731
        name = get("video")
        path = videos / str(name) if name else None
        video = path.read_bytes() if path is not None and path.is_file() else None
        key = str(get("key") or (Path(str(name)).stem if name else f"row-{n:06d}"))
        meta = {k: _number(v) for k, v in record.items() if k not in ("video", "caption", "key")}
        for field in (*REQUIRED_FIELDS, "clip_span"):
            value = get(field)
            if value not in (None, ""):
                meta[field] = _number(value) if field != "clip_span" else value
        yield key, video, get("caption") or "", meta


def rows_from_video2dataset(source: Path, mapping: Dict[str, str], progress: Optional[Progress] = None
                            ) -> Iterator[Tuple]:
    """video2dataset output: tar shards or loose KEY.mp4 / KEY.txt / KEY.json files. Tars are read by
    data/tar_samples.py: a break in one is a row of its own (keyed tar@offset), the samples around it are kept."""
    from data.tar_samples import TarBreak, decode_sample, read_tar

    kino_shards = (source / MANIFEST_NAME).exists()  # a Kino dataset: a clip_span there is a cut already made

    def apply_mapping(meta):
        if kino_shards and "clip_span" in meta:
            meta["source_clip_span"] = meta.pop("clip_span")
        for field, source_field in mapping.items():
            if field == "caption":
                continue
            value = _lookup(meta, source_field)
            if value not in (None, ""):
                meta[field] = _number(value)
        return meta

    tars = sorted(source.glob("*.tar"))
    if tars:
        total, done = sum(t.stat().st_size for t in tars), 0
        for tar in tars:
            for item in read_tar(tar):
                if isinstance(item, TarBreak):
                    where = f"{tar.name}@{item.offset}"
                    yield (f"{item.key} ({where})" if item.key else where), None, None, {}, [item.reason]
                    continue
                video, caption, meta, problems = decode_sample(item)
                if caption is None and not problems:
                    caption = str(_lookup(meta, mapping.get("caption", "caption")) or "")
                yield item.key, video, caption, apply_mapping(dict(meta)), problems
            done += tar.stat().st_size
            if progress is not None:
                progress.fraction = done / max(total, 1)
        return
    for video in sorted(source.rglob("*.mp4")):
        caption_path, meta_path = video.with_suffix(".txt"), video.with_suffix(".json")
        members = {"mp4": video.read_bytes()}
        if caption_path.exists():
            members["txt"] = caption_path.read_bytes()
        if meta_path.exists():
            members["json"] = meta_path.read_bytes()
        from data.tar_samples import TarSample

        data, caption, meta, problems = decode_sample(TarSample(video.stem, members, 0))
        yield video.stem, data, caption or "", apply_mapping(dict(meta)), problems

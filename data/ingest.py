"""Ingest licensed videos into shards: from a folder + metadata table, or from video2dataset output."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from data.schema import REQUIRED_FIELDS, metadata_problems
from data.shards import ShardSetWriter


def read_table(path: Path) -> List[Dict[str, Any]]:
    """Rows of a CSV, JSONL or Parquet metadata table."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="") as handle:
            return [dict(row) for row in csv.DictReader(handle)]
    if suffix in (".jsonl", ".ndjson"):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: metadata must be .csv, .jsonl or .parquet")


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
    """Width, height, fps and frame count of encoded video bytes."""
    import av

    with av.open(io.BytesIO(video)) as container:
        stream = container.streams.video[0]
        frames = stream.frames or sum(1 for _ in container.decode(video=0))
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


def ingest_rows(rows: Iterator[Tuple[str, Optional[bytes], str, Dict[str, Any]]], out: Path,
              samples_per_shard: int, shard_bytes: Optional[int]) -> Dict[str, Any]:
    """Validate each (key, video bytes, caption, metadata) row and write the accepted ones."""
    writer = ShardSetWriter(out, samples_per_shard=samples_per_shard, max_bytes=shard_bytes)
    accepted, rejected = 0, []
    for key, video, caption, meta in rows:
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
                    meta["clip_span"] = list(span)
                    meta.update(probed)
                else:
                    probed = probe(video)
                    for name, value in probed.items():
                        meta.setdefault(name, value)
            except Exception as error:  # undecodable input is reported, never written
                problems.append(f"video unreadable: {type(error).__name__}: {str(error)[:120]}")
        problems += metadata_problems(meta)
        if not isinstance(caption, str) or not caption.strip():
            problems.append("missing caption")
        if problems:
            rejected.append({"key": key, "reasons": problems})
            continue
        writer.write(key, video, caption, meta)
        accepted += 1
    manifest = writer.close({"name": out.name, "builder": "data.ingest"})
    report = {"accepted": accepted, "rejected": len(rejected), "rejections": rejected, "manifest": str(manifest)}
    (out / "ingest_report.json").write_text(json.dumps(report, indent=1))
    return report


def rows_from_table(videos: Path, table: Path, mapping: Dict[str, str]) -> Iterator[Tuple]:
    """Rows of a metadata table whose `video` column names a file under `videos`."""
    for n, record in enumerate(read_table(table)):
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


def rows_from_video2dataset(source: Path, mapping: Dict[str, str]) -> Iterator[Tuple]:
    """video2dataset output: tar shards or loose KEY.mp4 / KEY.txt / KEY.json files."""
    import webdataset as wds

    def convert(key, video, caption_bytes, meta_bytes):
        record = json.loads(meta_bytes or b"{}")
        meta = dict(record)
        for field, source_field in mapping.items():
            value = _lookup(record, source_field)
            if value not in (None, ""):
                meta[field] = _number(value)
        caption = (caption_bytes or b"").decode("utf-8", errors="strict") if caption_bytes else \
            str(_lookup(record, mapping.get("caption", "caption")) or "")
        return key, video, caption, meta

    tars = sorted(source.glob("*.tar"))
    if tars:
        for tar in tars:
            for sample in wds.tarfile_samples([{"url": str(tar)}], handler=lambda error: True):
                yield convert(sample["__key__"], sample.get("mp4"), sample.get("txt"), sample.get("json"))
        return
    for video in sorted(source.rglob("*.mp4")):
        caption, meta = video.with_suffix(".txt"), video.with_suffix(".json")
        yield convert(video.stem, video.read_bytes(), caption.read_bytes() if caption.exists() else None,
                      meta.read_bytes() if meta.exists() else None)

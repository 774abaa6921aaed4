"""Ingest licensed videos into shards: from a folder + metadata table, or from video2dataset output.

Nothing in the input crashes it and nothing is lost silently: every row or tar break that is not written lands in
ingest_report.json with its key (or tar offset) and reason, and the manifest and report are written even if the
ingest stops on an error of its own."""
from __future__ import annotations

import csv
import io
import json
import sys
import time
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


class Progress:
    """A progress line on stderr every few seconds: samples/s and, when the input's size is known, an ETA."""

    def __init__(self, every_s: float = 5.0):
        self.every_s, self.started, self.last = every_s, time.monotonic(), time.monotonic()
        self.fraction: Optional[float] = None  # of the input read, set by the row source when it knows

    def update(self, accepted: int, rejected: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        done = accepted + rejected
        rate = done / max(now - self.started, 1e-9)
        eta = ""
        if self.fraction:
            eta = f", ETA {int((now - self.started) * (1 - self.fraction) / self.fraction)} s"
        print(f"ingest: {done} rows ({accepted} written, {rejected} rejected), {rate:.1f} samples/s{eta}",
              file=sys.stderr, flush=True)


def ingest_rows(rows: Iterator[Tuple], out: Path, samples_per_shard: int, shard_bytes: Optional[int],
                progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Validate each (key, video bytes, caption, metadata[, problems found reading it]) row and write the accepted
    ones. A row whose key is only a tar offset (a break in a tar) is reported as it is."""
    writer = ShardSetWriter(out, samples_per_shard=samples_per_shard, max_bytes=shard_bytes)
    progress = progress or Progress()
    accepted, rejected, keys, aborted = 0, [], set(), None
    try:
        for row in rows:
            key, video, caption, meta = row[:4]
            problems = list(row[4]) if len(row) > 4 else []
            if key in keys:
                problems.append(f"duplicate key: an earlier row has {key!r}; the first is kept")
            if not problems:
                problems = _check_row(video, caption, meta)
            if problems:
                rejected.append({"key": key, "reasons": problems})
            else:
                writer.write(key, video, caption, meta)
                keys.add(key)
                accepted += 1
            progress.update(accepted, len(rejected))
    except Exception as error:  # a fault of ingest itself: what was written so far is still recorded
        aborted = f"{type(error).__name__}: {error}"
    manifest = writer.close({"name": out.name, "builder": "data.ingest"})
    report = {"accepted": accepted, "rejected": len(rejected), "rejections": rejected, "manifest": str(manifest)}
    if aborted:
        report["aborted"] = aborted
    (out / "ingest_report.json").write_text(json.dumps(report, indent=1))
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
                meta["clip_span"] = list(span)
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


def rows_from_video2dataset(source: Path, mapping: Dict[str, str], progress: Optional[Progress] = None
                            ) -> Iterator[Tuple]:
    """video2dataset output: tar shards or loose KEY.mp4 / KEY.txt / KEY.json files. Tars are read by
    data/tar_samples.py: a break in one is a row of its own (keyed tar@offset), the samples around it are kept."""
    from data.tar_samples import TarBreak, decode_sample, read_tar

    def apply_mapping(meta):
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

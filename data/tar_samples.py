"""Samples of a WebDataset tar read so that nothing is lost silently: every sample that can be read is, and every
break (a corrupt header, a truncated member, a repeated key or member) is reported with its byte offset.

A corrupt block is skipped by scanning forward to the next valid tar header, so the samples after it are kept. A
file that ends inside a member keeps the samples before it. A key seen before (adjacent or not) is a duplicate:
reported, and the first sample with it kept. Used by `python -m data ingest`, `verify`, `inspect`
and `takedown`; the loader reads shards that `verify` has passed.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

BLOCK = 512


@dataclass
class TarSample:
    key: str
    members: Dict[str, bytes]  # extension ("mp4", "txt", "json") -> bytes
    offset: int  # byte offset of its first member's header


@dataclass
class TarBreak:
    """Something in the tar that is not a readable sample, and where."""

    offset: int
    reason: str
    key: Optional[str] = None


@dataclass
class _Pending:
    key: str
    offset: int
    members: Dict[str, bytes] = field(default_factory=dict)


def split_name(name: str):
    """WebDataset's convention: the key is the path up to the first dot of the file name, the rest its type."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension


def add_sample(tar: tarfile.TarFile, key: str, members: Dict[str, bytes]) -> None:
    """Append one sample's members (`KEY.EXT` each) to an open tar, with fixed times and read-only modes so the
    same samples always give the same bytes."""
    for extension, data in members.items():
        info = tarfile.TarInfo(f"{key}.{extension}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        tar.addfile(info, io.BytesIO(data))


def _valid_header(block: bytes) -> Optional[tarfile.TarInfo]:
    try:
        return tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except (tarfile.HeaderError, ValueError):
        return None


def read_tar(path) -> Iterator[Union[TarSample, TarBreak]]:
    """Samples in file order, and a TarBreak wherever something could not be read."""
    from data.storage import open_read, size_of

    size = size_of(path)
    seen_keys = set()
    pending: Optional[_Pending] = None
    long_name: Optional[str] = None
    with open_read(path) as handle:
        position = 0
        while position + BLOCK <= size:
            handle.seek(position)
            block = handle.read(BLOCK)
            if block == b"\0" * BLOCK:  # the end-of-archive marker
                break
            info = _valid_header(block)
            if info is None:
                start = position
                position += BLOCK
                while position + BLOCK <= size:  # resynchronise on the next header that checks out
                    handle.seek(position)
                    candidate = handle.read(BLOCK)
                    if candidate != b"\0" * BLOCK and _valid_header(candidate) is not None:
                        break
                    position += BLOCK
                yield TarBreak(start, f"corrupt tar data at bytes {start}-{position}: skipped to the next header"
                               if position + BLOCK <= size else f"corrupt tar data from byte {start} to the end")
                continue
            data_start = position + BLOCK
            if data_start + info.size > size:
                key = split_name(long_name or info.name)[0]
                if pending is not None and pending.key != key:  # the sample before the break is whole
                    yield from _finish(pending, seen_keys)
                yield TarBreak(position, f"tar truncated inside member {long_name or info.name!r} (it claims "
                                         f"{info.size} bytes, {size - data_start} remain)", key)
                pending = None  # the sample it cuts is incomplete: reported, not kept
                break
            handle.seek(data_start)
            data = handle.read(info.size)
            position = data_start + (info.size + BLOCK - 1) // BLOCK * BLOCK
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
                long_name = _pax_path(data) or long_name
                continue
            name, long_name = long_name or info.name, None
            if not info.isfile():
                continue
            key, extension = split_name(name)
            if pending is not None and (key != pending.key or extension in pending.members):
                # a new key, or the same key again with a member it already has: the next sample begins
                yield from _finish(pending, seen_keys)
                pending = None
            if pending is None:
                pending = _Pending(key, data_start - BLOCK)
            pending.members[extension] = data
    if pending is not None:
        yield from _finish(pending, seen_keys)


def _finish(pending: _Pending, seen_keys) -> Iterator[Union[TarSample, TarBreak]]:
    if pending.key in seen_keys:
        yield TarBreak(pending.offset, f"duplicate key {pending.key!r}: an earlier sample has it; this one is not "
                                       f"kept", pending.key)
        return
    seen_keys.add(pending.key)
    yield TarSample(pending.key, pending.members, pending.offset)


def _pax_path(data: bytes) -> Optional[str]:
    """The `path` record of a pax extended header ("<length> path=<name>\\n" records)."""
    text = data.decode("utf-8", "surrogateescape")
    for record in text.split("\n"):
        _, _, keyvalue = record.partition(" ")
        name, _, value = keyvalue.partition("=")
        if name == "path":
            return value
    return None


def decode_sample(sample: TarSample, video_member: str = "mp4") -> Tuple[Optional[bytes], Optional[str],
                                                                         Dict[str, Any], List[str]]:
    """(video bytes, caption, metadata, problems) of a sample: a caption that is not UTF-8, metadata that is not a
    JSON object or a missing video is a problem, reported, never a crash. The caption falls back to the metadata's
    `caption` field when the sample has no .txt member."""
    problems: List[str] = []
    meta: Dict[str, Any] = {}
    if "json" in sample.members:
        try:
            parsed = json.loads(sample.members["json"])
            if isinstance(parsed, dict):
                meta = parsed
            else:
                problems.append(f"metadata is JSON but not an object ({type(parsed).__name__})")
        except (ValueError, UnicodeDecodeError) as error:
            problems.append(f"metadata is not JSON: {str(error)[:80]}")
    caption = None
    if "txt" in sample.members:
        try:
            caption = sample.members["txt"].decode("utf-8")
        except UnicodeDecodeError as error:
            problems.append(f"caption is not UTF-8 (byte {sample.members['txt'][error.start]:#04x} at "
                            f"position {error.start})")
    elif isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    video = sample.members.get(video_member)
    if video is None:
        problems.append(f"no video member (.{video_member}); members: {', '.join(sorted(sample.members)) or 'none'}")
    return video, caption, meta, problems

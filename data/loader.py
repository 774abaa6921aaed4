"""Stream licensed clips from WebDataset shards into packed micro-batches.

Each (rank, worker) reads its own stream: a seeded per-epoch permutation of the
shards, dealt round-robin. A stream's position is (epoch, raw samples consumed);
every batch carries the position from which the stream would resume after it, so
a checkpoint records exactly what was trained and resume neither repeats nor skips.
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from data.buckets import BucketShape, GreedyPacker, assign_bucket
from data.decode import ClipTooShort, decode_clip, frames_available
from data.licenses import LicensePolicy
from data.schema import metadata_problems, parse_metadata, read_manifest

log = logging.getLogger(__name__)
_warned: set = set()


def _warn_once(key: str, message: str, *args) -> None:
    """Each bad sample is named once per process, not once per epoch."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)

METADATA_INVALID = "metadata_invalid"
UNDECODABLE = "undecodable"
TOO_SHORT = "too_short"
CAPTION_INVALID = "caption_not_utf8"
CORRUPT_SHARD = "corrupt_shard"
INCOMPLETE_SAMPLE = "incomplete_sample"


@dataclass
class LoaderSpec:
    """What a stream needs to turn raw samples into batches for one curriculum stage."""

    root: str
    shards: List[str]
    policy: LicensePolicy
    shapes: List[BucketShape]
    token_budget: int
    patch_size: Tuple[int, int, int]
    temporal_factor: int
    spatial_factor: int
    fps: float
    seed: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    # stream id -> [epoch, position]
    positions: Dict[int, List[int]] = field(default_factory=dict)


def shard_plan(shards: Sequence[str], num_streams: int, seed: int, epoch: int) -> List[List[str]]:
    order = sorted(shards)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return [order[i::num_streams] for i in range(num_streams)]


def dataset_shards(root) -> List[str]:
    return [row["path"] for row in read_manifest(root)["shards"]]


class ClipStream(IterableDataset):
    def __init__(self, spec: LoaderSpec):
        super().__init__()
        self.spec = spec
        streams = spec.world_size * max(1, spec.num_workers)
        if len(spec.shards) < streams:
            raise ValueError(f"{len(spec.shards)} shards cannot feed {spec.world_size} ranks x "
                             f"{max(1, spec.num_workers)} workers: write more, smaller shards")

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        spec = self.spec
        info = get_worker_info()
        workers = max(1, spec.num_workers)
        stream_id = spec.rank * workers + (info.id if info else 0)
        epoch, position = spec.positions.get(stream_id, [0, 0])
        while True:
            plan = shard_plan(spec.shards, spec.world_size * workers, spec.seed, epoch)[stream_id]
            yield from self._epoch(stream_id, epoch, position, plan)
            epoch, position = epoch + 1, 0

    def _raw_samples(self, plan: List[str], errors: List[Tuple[str, str]]) -> Iterator[Dict[str, Any]]:
        for shard in plan:
            def note(error: Exception, shard=shard) -> bool:
                errors.append((shard, f"{type(error).__name__}: {error}"))
                return True  # keep going with the next shard
            yield from wds.tarfile_samples([{"url": str(Path(self.spec.root) / shard)}], handler=note)

    def _epoch(self, stream_id: int, epoch: int, start: int, plan: List[str]) -> Iterator[Dict[str, Any]]:
        spec = self.spec
        packer = GreedyPacker(spec.token_budget)
        dropped: List[Tuple[int, str, str]] = []  # (raw index, reason, key)
        errors: List[Tuple[str, str]] = []

        def note_errors(index: int) -> None:
            # A shard that broke off is noted where the stream stood; before `start` it was counted already.
            while errors:
                shard, message = errors.pop(0)
                if index >= start:
                    _warn_once(shard, "corrupt shard %s (skipped from here on, counted): %s", shard, message)
                    dropped.append((index, CORRUPT_SHARD, shard))

        index = 0
        for raw in self._raw_samples(plan, errors):
            note_errors(index)
            if index < start:  # consumed before the checkpoint we resumed from
                index += 1
                continue
            item, reason = self._prepare(raw, epoch, stream_id, index)
            if item is None:
                dropped.append((index, reason, raw.get("__key__", "?")))
            else:
                closed = packer.add(item, item["tokens"])
                for n, batch in enumerate(closed):
                    # Resume at the first sample not yet emitted: the next closed batch's, the open batch's,
                    # or the one after this sample.
                    following = closed[n + 1:] + ([packer.items] if packer.items else [])
                    resume_at = following[0][0]["index"] if following else index + 1
                    yield self._batch(batch, dropped, stream_id, [epoch, resume_at])
            index += 1
        note_errors(index)
        leftover = packer.flush()
        if leftover or dropped:
            yield self._batch(leftover, dropped, stream_id, [epoch + 1, 0])

    @staticmethod
    def _batch(items: List[Dict[str, Any]], dropped: List[Tuple[int, str, str]], stream_id: int,
               resume_position: List[int]) -> Dict[str, Any]:
        epoch_ended = resume_position[1] == 0
        ours = [d for d in dropped if epoch_ended or d[0] < resume_position[1]]
        dropped[:] = [d for d in dropped if not (epoch_ended or d[0] < resume_position[1])]
        return {
            "videos": [item["video"] for item in items],
            "captions": [item["caption"] for item in items],
            "keys": [item["key"] for item in items],
            "shards": [item["shard"] for item in items],
            "meta": [item["meta"] for item in items],
            "tokens": sum(item["tokens"] for item in items),
            "stream": stream_id,
            "resume_position": resume_position,
            "dropped": [(reason, key) for _, reason, key in ours],
        }

    def _prepare(self, raw: Dict[str, Any], epoch: int, stream_id: int, index: int):
        spec = self.spec
        key = raw.get("__key__", "?")
        if "json" not in raw or "mp4" not in raw or "txt" not in raw:
            return None, INCOMPLETE_SAMPLE
        try:
            meta = parse_metadata(raw["json"])
        except (ValueError, UnicodeDecodeError):
            return None, METADATA_INVALID
        # The license gate comes first: a disallowed sample is never even decoded.
        reason = spec.policy.rejection(meta)
        if reason:
            return None, reason
        if metadata_problems(meta):
            return None, METADATA_INVALID
        try:
            caption = raw["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return None, CAPTION_INVALID
        available = frames_available(int(meta["num_frames"]), float(meta["fps"]), spec.fps)
        shape = assign_bucket(spec.shapes, int(meta["width"]), int(meta["height"]), available)
        if shape is None:
            return None, TOO_SHORT
        rng = random.Random(f"{spec.seed}/{epoch}/{stream_id}/{index}")
        try:
            video = decode_clip(raw["mp4"], shape, spec.fps, rng)
        except ClipTooShort:
            return None, TOO_SHORT
        except Exception as error:  # decord raises its own error types for broken streams
            _warn_once(key, "undecodable video %s (skipped, counted): %s", key, (str(error) or repr(error)).splitlines()[0][:200])
            return None, UNDECODABLE
        shard = Path(raw.get("__url__", "?")).name
        tokens = shape.tokens(spec.patch_size, spec.temporal_factor, spec.spatial_factor)
        return {"video": video, "caption": caption, "key": key, "shard": shard, "meta": meta,
                "tokens": tokens, "index": index}, None


def make_loader(spec: LoaderSpec) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ClipStream(spec), batch_size=None, num_workers=spec.num_workers,
        persistent_workers=False, prefetch_factor=2 if spec.num_workers else None,
    )


def drop_counts(batches: Sequence[Dict[str, Any]]) -> Counter:
    return Counter(reason for batch in batches for reason, _ in batch["dropped"])

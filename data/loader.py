"""Stream licensed clips from WebDataset shards into packed micro-batches.

Each consumer, one per (rank, loader worker), asks the data coordinator for chunks of
shards, reads them, gates, decodes and fits each sample to a bucket, and packs clips of
mixed shapes into micro-batches up to the stage's token budget. Every sample carries its
tag (epoch, chunk, offset); a batch lists the tags of what it holds and of what was
dropped since the last batch, and the trainer acknowledges them after its optimizer step.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from data.buckets import BucketShape, WindowPacker, assign_bucket
from data.coordinator import CoordinatorClient, Tag
from data.decode import ClipTooShort, decode_clip, frames_available
from data.licenses import LicensePolicy
from data.schema import metadata_problems, parse_metadata, read_manifest

log = logging.getLogger(__name__)
_warned: set = set()

METADATA_INVALID = "metadata_invalid"
UNDECODABLE = "undecodable"
TOO_SHORT = "too_short"
CAPTION_INVALID = "caption_not_utf8"
CORRUPT_SHARD = "corrupt_shard"
INCOMPLETE_SAMPLE = "incomplete_sample"
# Drops are handed to the trainer at least this often, even when nothing is being packed.
DROP_FLUSH = 64


def _warn_once(key: str, message: str, *args) -> None:
    """Each bad sample is named once per process, not once per epoch."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


@dataclass
class LoaderSpec:
    """What a consumer needs to turn raw samples into batches for one curriculum stage."""

    root: str
    policy: LicensePolicy
    shapes: List[BucketShape]
    token_budget: int
    patch_size: Tuple[int, int, int]
    temporal_factor: int
    spatial_factor: int
    fps: float
    seed: int
    coordinator: CoordinatorClient
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    pack_window: int = 16
    pack_tolerance: float = 0.01
    image_fraction: float = 0.0  # share of samples trained as one frame (the stage's image/video mix)
    # consumer name -> the snapshot its last trained batch carried (resume exactly where it stood)
    resume: Optional[Dict[str, Dict[str, Any]]] = None


def dataset_rows(root) -> List[Tuple[str, int]]:
    """(shard file, sample count) for every shard of a dataset's manifest."""
    return [(row["path"], int(row["num_samples"])) for row in read_manifest(root)["shards"]]


class ClipStream(IterableDataset):
    def __init__(self, spec: LoaderSpec):
        super().__init__()
        self.spec = spec

    def consumer(self) -> Tuple[str, int, int]:
        """(name, slot, slots): slots are rank x worker, so the same world reads the same data."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return f"rank{self.spec.rank}-worker{worker}", self.spec.rank * workers + worker, self.spec.world_size * workers

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        """Batches, each carrying this consumer's snapshot after it: the clips still buffered for
        packing (by tag), the chunk being read and the next offset in it, and batches closed but not yet
        handed out."""
        spec = self.spec
        name, slot, slots = self.consumer()
        packer = WindowPacker(spec.token_budget, spec.pack_window, spec.pack_tolerance)
        self._dropped: List[Tuple[Tag, str, str]] = []
        self._current: Optional[Dict[str, Any]] = None
        self._replaying: List[List[Any]] = []  # snapshot buffer entries not yet re-read
        snapshot = (spec.resume or {}).get(name)
        if snapshot and snapshot.get("stage") == self._stage_key():
            # Same stage: batches that were already closed come out again exactly as they were.
            for n, entries in enumerate(snapshot["pending"]):
                items = [self._prepare(raw, tag)[0] for raw, tag, _ in self._read_tags(entries)]
                yield self._batch([i for i in items if i is not None], name, packer, snapshot["pending"][n + 1:])
            snapshot = dict(snapshot, pending=[])
        elif snapshot:  # a new stage re-buckets: closed batches go back into packing, in order
            snapshot = dict(snapshot, buffer=[e for batch in snapshot["pending"] for e in batch] + snapshot["buffer"],
                            pending=[])
        for raw, tag, error in self._resumed_then_new(snapshot, name, slot, slots):
            if error is not None:
                self._dropped.append((tag, CORRUPT_SHARD, error))
                continue
            item, reason = self._prepare(raw, tag)
            if item is None:
                self._dropped.append((tag, reason, raw.get("__key__", "?")))
            else:
                closed = packer.add(item, item["tokens"])
                for n, batch in enumerate(closed):
                    yield self._batch(batch, name, packer, [self._entries(b) for b in closed[n + 1:]])
            if len(self._dropped) >= DROP_FLUSH:
                yield self._batch([], name, packer, [])

    def _stage_key(self) -> List[Any]:
        return [self.spec.token_budget, [[s.frames, s.height, s.width] for s in self.spec.shapes]]

    @staticmethod
    def _entries(items: List[Dict[str, Any]]) -> List[List[Any]]:
        return [[*item["tag"], item["shard_file"]] for item in items]

    def _resumed_then_new(self, snapshot, name: str, slot: int, slots: int):
        if snapshot:
            self._current = snapshot["current"] and dict(snapshot["current"])
            self._replaying = [list(entry) for entry in snapshot["buffer"]]
            yield from self._read_tags(snapshot["buffer"], replaying=True)  # what sat in the packer, in order
            if snapshot["current"] is not None:
                yield from self._read_chunk(snapshot["current"]["work"], snapshot["current"]["next"])
        while True:
            yield from self._read_chunk(self.spec.coordinator.request(name, slot, slots))

    def _read_tags(self, entries: List[List[Any]], replaying: bool = False):
        """Re-read specific samples by tag (epoch, chunk, offset, shard), in the given order."""
        wanted: Dict[str, Dict[int, List[Tag]]] = {}  # one offset can be wanted in several epochs
        for epoch, chunk, offset, shard in entries:
            wanted.setdefault(shard, {}).setdefault(offset, []).append((epoch, chunk, offset))
        found: Dict[Tag, Dict[str, Any]] = {}
        for shard, offsets in wanted.items():
            for offset, raw in enumerate(wds.tarfile_samples([{"url": str(Path(self.spec.root) / shard)}],
                                                             handler=lambda error: False)):
                for tag in offsets.get(offset, ()):
                    found[tag] = raw
                if offset >= max(offsets):
                    break
        for epoch, chunk, offset, shard in entries:
            tag = (epoch, chunk, offset)
            if replaying:
                self._replaying.pop(0)
            yield (found[tag], tag, None) if tag in found else (None, tag, shard)

    def _read_chunk(self, work: Dict[str, Any], first: int = 0):
        epoch, chunk, start, stop = work["epoch"], work["chunk"], work["start"], work["stop"]
        skip = set(work["skip"])
        errors: List[str] = []

        def note(error: Exception) -> bool:
            errors.append(f"{type(error).__name__}: {error}")
            return False  # stop reading this shard

        path = str(Path(self.spec.root) / work["shard"])
        offset = 0
        begin = max(start, first)
        self._current = {"work": work, "next": begin}
        for raw in wds.tarfile_samples([{"url": path}], handler=note):
            if offset >= stop:
                break
            if offset >= begin and offset not in skip:
                self._current["next"] = offset + 1
                yield raw, (epoch, chunk, offset), None
            offset += 1
        if offset < stop:  # the tar ended or broke before the manifest's count: those samples are lost
            detail = errors[0] if errors else "fewer samples than the manifest lists"
            _warn_once(work["shard"], "corrupt shard %s (samples from %d on skipped, counted): %s",
                       work["shard"], max(offset, begin), detail)
            for missing in range(max(offset, begin), stop):
                if missing not in skip:
                    self._current["next"] = missing + 1
                    yield None, (epoch, chunk, missing), work["shard"]
        self._current = None

    def _batch(self, items: List[Dict[str, Any]], consumer: str, packer: WindowPacker,
               pending: List[List[List[Any]]]) -> Dict[str, Any]:
        dropped, self._dropped = self._dropped, []
        current = None
        if self._current is not None and self._current["next"] < self._current["work"]["stop"]:
            current = {"work": self._current["work"], "next": self._current["next"]}
        # Every drop so far goes out with this batch, so a snapshot never holds any. `pending`: batches
        # the packer closed together with this one, not yet handed out.
        snapshot = {"stage": self._stage_key(), "pending": pending,
                    "buffer": self._entries([entry[0] for entry in packer.buffer])
                    + [list(entry) for entry in self._replaying],
                    "current": current}
        return {
            "videos": [item["video"] for item in items],
            "captions": [item["caption"] for item in items],
            "keys": [item["key"] for item in items],
            "shards": [item["shard"] for item in items],
            "meta": [item["meta"] for item in items],
            "tags": [item["tag"] for item in items],
            "tokens": sum(item["tokens"] for item in items),
            "dropped": [(reason, key) for _, reason, key in dropped],
            "dropped_tags": [tag for tag, _, _ in dropped],
            "consumer": consumer,
            "snapshot": snapshot,
        }

    def _prepare(self, raw: Dict[str, Any], tag: Tag):
        return prepare_sample(raw, tag, self.spec)


def prepare_sample(raw: Dict[str, Any], tag: Tag, spec: LoaderSpec):
    """One raw WebDataset sample -> (item, None) ready to pack, or (None, reason) for a sample that must not
    reach the model. The license gate comes first; the random choices (crop, frames, image or clip) depend
    only on the seed and the sample's tag, so whoever reads it makes the same ones."""
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
    rng = random.Random(f"{spec.seed}/{tag[0]}/{tag[1]}/{tag[2]}")  # the same choices whoever reads it
    available = frames_available(int(meta["num_frames"]), float(meta["fps"]), spec.fps)
    if spec.image_fraction and rng.random() < spec.image_fraction:
        available = 1  # this sample trains as an image: one frame of the clip
    shapes = [s for s in spec.shapes if s.frames == 1] if available == 1 else spec.shapes
    shape = assign_bucket(shapes or spec.shapes, int(meta["width"]), int(meta["height"]), available)
    if shape is None:
        return None, TOO_SHORT
    try:
        video = decode_clip(raw["mp4"], shape, spec.fps, rng)
    except ClipTooShort:
        return None, TOO_SHORT
    except Exception as error:  # decord raises its own error types for broken streams
        _warn_once(key, "undecodable video %s (skipped, counted): %s", key,
                   (str(error) or repr(error)).splitlines()[0][:200])
        return None, UNDECODABLE
    shard = Path(raw.get("__url__", "?")).name
    tokens = shape.tokens(spec.patch_size, spec.temporal_factor, spec.spatial_factor)
    return {"video": video, "caption": caption, "key": key, "shard": shard, "shard_file": shard,
            "meta": meta, "tokens": tokens, "tag": tag}, None


def make_loader(spec: LoaderSpec) -> torch.utils.data.DataLoader:
    # Workers are spawned, not forked: a fork would inherit the parent's Ray connection, which breaks.
    return torch.utils.data.DataLoader(
        ClipStream(spec), batch_size=None, num_workers=spec.num_workers,
        persistent_workers=False, prefetch_factor=2 if spec.num_workers else None,
        multiprocessing_context="spawn" if spec.num_workers else None,
    )

"""Stream licensed clips from WebDataset shards into packed micro-batches.

Each consumer, one per (rank, loader worker), asks the data coordinator for chunks of
shards, reads them, gates, decodes and fits each sample to a bucket, and packs clips of
mixed shapes into micro-batches up to the stage's token budget. Every sample carries its
tag (epoch, chunk, offset); a batch lists the tags of what it holds and of what was
dropped since the last batch, and the trainer acknowledges them after its optimizer step.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data.batch import ConsumerSnapshot, Drop, Entry, PackedBatch, PreparedClip
from data.buckets import BucketShape, WindowPacker, assign_bucket, stage_shapes
from data.coordinator import CoordinatorClient, Tag
from data.decode import ClipTooShort, UndecodableVideo, decode_clip, frames_available
from data.licenses import LicensePolicy
from data.reader import ConsumerReader, read_entries, warn_once
from data.schema import manifest_fingerprint, metadata_problems, parse_metadata, shard_plan

METADATA_INVALID = "metadata_invalid"
UNDECODABLE = "undecodable"
TOO_SHORT = "too_short"
CAPTION_INVALID = "caption_not_utf8"
CORRUPT_SHARD = "corrupt_shard"
INCOMPLETE_SAMPLE = "incomplete_sample"
# Drops are handed to the trainer at least this often, even when nothing is being packed.
DROP_FLUSH = 64


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
    strict_epochs: bool = False  # data.strict_epochs: a batch never mixes epochs (a newer one closes the older)
    image_fraction: float = 0.0  # share of samples trained as one frame (the stage's image/video mix)
    decoder: str = "decord"  # data.decoder
    pin_memory: bool = False  # batches in page-locked memory (for a CUDA trainer's non-blocking copies)
    # consumer name -> the snapshot its last trained batch carried (resume exactly where it stood)
    resume: Optional[Dict[str, ConsumerSnapshot]] = None


def stage_spec(cfg, stage, root, policy: LicensePolicy, coordinator, **more) -> LoaderSpec:
    """What reading `stage` from `root` takes from the run's config: its buckets and budget, the model's patches
    and autoencoder factors, the data's rate, seed and decoder. `more`: the reader's own fields (ranks, workers,
    resume, ...)."""
    ae = cfg.model.autoencoder
    return LoaderSpec(root=root, policy=policy, shapes=stage_shapes(cfg, stage), token_budget=stage.token_budget,
                      patch_size=tuple(cfg.model.patch_size), temporal_factor=ae.temporal_factor,
                      spatial_factor=ae.spatial_factor, fps=cfg.data.fps, seed=cfg.data.seed,
                      coordinator=coordinator, decoder=cfg.data.decoder, **more)


def dataset_fingerprint(root) -> str:
    """sha256 over the manifest's shards (name, sample count, file sha256): changes when any shard does."""
    return manifest_fingerprint(root)


def dataset_rows(root) -> List[Tuple[str, int]]:
    """(shard file, sample count) for every shard of a dataset's manifest."""
    return list(zip(*shard_plan(root)))


class ClipStream(IterableDataset):
    """One consumer's packed batches: it reads raw samples (data/reader.py), prepares each one
    (`prepare_sample`) and packs the clips up to the token budget."""

    def __init__(self, spec: LoaderSpec):
        super().__init__()
        self.spec = spec

    def consumer(self) -> Tuple[str, int, int]:
        """(name, slot, slots): slots are rank x worker, so the same world reads the same data."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return f"rank{self.spec.rank}-worker{worker}", self.spec.rank * workers + worker, self.spec.world_size * workers

    def stage_key(self) -> List[Any]:
        return [self.spec.token_budget, [[s.frames, s.height, s.width] for s in self.spec.shapes]]

    def __iter__(self) -> Iterator[PackedBatch]:
        spec = self.spec
        name, slot, slots = self.consumer()
        reader = ConsumerReader(spec.root, spec.coordinator, name, slot, slots)
        batches = _BatchAssembler(name, self.stage_key(), WindowPacker(spec.token_budget, spec.pack_window,
                                                                       spec.pack_tolerance), reader)
        snapshot = (spec.resume or {}).get(name)
        covered = snapshot.chunks() if snapshot is not None else frozenset()
        if snapshot is not None and snapshot.stage == self.stage_key():
            # Same stage: batches that were already closed come out again exactly as they were. Until the reader
            # starts, the consumer still stands where the snapshot says: its buffer and chunk go into each
            # replayed batch's snapshot, so a checkpoint taken right after one loses nothing.
            reader.unread_replay, reader.position = [list(e) for e in snapshot.buffer], snapshot.current
            for n, entries in enumerate(snapshot.pending):
                clips = []
                for raw, tag, error in read_entries(spec.root, entries):
                    clip, reason = (None, CORRUPT_SHARD) if error is not None else prepare_sample(raw, tag, spec)
                    if clip is None:  # readable and licensed when it was packed; no longer (a changed shard)
                        batches.dropped.append(Drop(tag, reason, error or raw.get("__key__", "?")))
                    else:
                        clips.append(clip)
                yield batches.assemble(clips, snapshot.pending[n + 1:])
            snapshot = ConsumerSnapshot(snapshot.stage, [], snapshot.buffer, snapshot.current)
        elif snapshot is not None:
            snapshot = snapshot.rebucketed()
        for raw, tag, error in reader.read(snapshot, covered):
            if error is not None:
                batches.dropped.append(Drop(tag, CORRUPT_SHARD, error))
                continue
            clip, reason = prepare_sample(raw, tag, spec)
            if clip is None:
                batches.dropped.append(Drop(tag, reason, raw.get("__key__", "?")))
            else:
                closed = batches.packer.close_all() if spec.strict_epochs and _older_epoch_held(batches.packer, clip) \
                    else []
                closed += batches.packer.add(clip, clip.tokens)
                for n, batch in enumerate(closed):
                    yield batches.assemble(batch, [[c.entry() for c in b] for b in closed[n + 1:]])
            if len(batches.dropped) >= DROP_FLUSH:
                yield batches.assemble([], [])
        # The reader ends only when no more work can be dealt (the coordinator is gone): what the packer holds
        # goes out in batches within the budget, so the step in progress can finish.
        clips, tokens = [], 0
        for clip in batches.packer.flush():
            if clips and tokens + clip.tokens > spec.token_budget:
                yield batches.assemble(clips, [])
                clips, tokens = [], 0
            clips.append(clip)
            tokens += clip.tokens
        if clips or batches.dropped:
            yield batches.assemble(clips, [])


def _older_epoch_held(packer: WindowPacker, clip: PreparedClip) -> bool:
    return any(held.tag[0] < clip.tag[0] for held, _ in packer.buffer)


class _BatchAssembler:
    """Closes a batch: its clips, the drops since the last one, and the consumer's snapshot after it."""

    def __init__(self, consumer: str, stage: List[Any], packer: WindowPacker, reader: ConsumerReader):
        self.consumer, self.stage, self.packer, self.reader = consumer, stage, packer, reader
        self.dropped: List[Drop] = []

    def assemble(self, clips: List[PreparedClip], pending: List[List[Entry]]) -> PackedBatch:
        # Every drop so far goes out with this batch, so a snapshot never holds any.
        dropped, self.dropped = self.dropped, []
        buffered = [clip.entry() for clip, _ in self.packer.buffer] + [list(e) for e in self.reader.unread_replay]
        snapshot = ConsumerSnapshot(self.stage, pending, buffered, self.reader.open_position())
        return PackedBatch(clips, dropped, self.consumer, snapshot)


def sample_rng(spec: LoaderSpec, tag: Tag) -> random.Random:
    """A sample's random choices (image or clip, crop, frames): from the seed and its tag alone, so whoever reads
    it, from the videos or from a cache, makes the same ones."""
    return random.Random(f"{spec.seed}/{tag[0]}/{tag[1]}/{tag[2]}")


def _gated_metadata(raw: Dict[str, Any], spec: LoaderSpec, members) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(metadata, None) for a sample with its members and an allowed license, else (None, the drop reason)."""
    if any(member not in raw for member in members):
        return None, INCOMPLETE_SAMPLE
    try:
        meta = parse_metadata(raw["json"])
    except (ValueError, UnicodeDecodeError):
        return None, METADATA_INVALID
    return meta, spec.policy.rejection(meta)


def prepare_cached_sample(raw: Dict[str, Any], tag: Tag, spec: LoaderSpec
                          ) -> Tuple[Optional[PreparedClip], Optional[str]]:
    """A latent-cache sample (data/latent_cache.py): the same license gate on the source's metadata; the latents
    as encoded; a sample drawn as an image trains on its first latent frame (the first frame alone, for the
    causal and pixel autoencoders). Its key and shard are the source's, so audit and provenance name the
    source sample."""
    from data.latent_cache import load_npy

    if "drop" in raw:  # a stub: the encode dropped this source sample, for this reason
        return None, raw["drop"].decode("utf-8", "replace")
    meta, reason = _gated_metadata(raw, spec, ("json", "txt"))
    if reason:
        return None, reason
    try:
        caption = raw["txt"].decode("utf-8")
        latent = torch.from_numpy(load_npy(raw["latent.npy"]))
        text = torch.from_numpy(load_npy(raw["text.npy"])) if "text.npy" in raw else None
        image = torch.from_numpy(load_npy(raw["image.npy"])) if "image.npy" in raw else None
        condition = torch.from_numpy(load_npy(raw["condition.npy"])) if "condition.npy" in raw else None
    except (ValueError, UnicodeDecodeError):
        return None, UNDECODABLE
    rng = sample_rng(spec, tag)
    if spec.image_fraction and rng.random() < spec.image_fraction:
        latent = latent[:, :1]
    pt, ph, pw = spec.patch_size
    _, t, h, w = latent.shape
    tokens = (t // pt) * (h // ph) * (w // pw)
    return PreparedClip(latent, caption, meta.get("source_key", raw.get("__key__", "?")),
                        meta.get("source_shard", Path(raw.get("__url__", "?")).name), meta, tokens, tag, text,
                        image, condition), None


def prepare_sample(raw: Dict[str, Any], tag: Tag, spec: LoaderSpec) -> Tuple[Optional[PreparedClip], Optional[str]]:
    """One raw WebDataset sample -> (clip, None) ready to pack, or (None, reason) for a sample that must not
    reach the model. The license gate comes first; the random choices (crop, frames, image or clip) depend
    only on the seed and the sample's tag, so whoever reads it makes the same ones."""
    key = raw.get("__key__", "?")
    if "latent.npy" in raw or ("drop" in raw and "mp4" not in raw):  # an encoded sample or a cache's stub
        return prepare_cached_sample(raw, tag, spec)
    meta, reason = _gated_metadata(raw, spec, ("json", "mp4", "txt"))
    if reason:  # the license gate comes first: a disallowed sample is never even decoded
        return None, reason
    if metadata_problems(meta):
        return None, METADATA_INVALID
    try:
        caption = raw["txt"].decode("utf-8")
    except UnicodeDecodeError:
        return None, CAPTION_INVALID
    rng = sample_rng(spec, tag)
    available = frames_available(int(meta["num_frames"]), float(meta["fps"]), spec.fps)
    if spec.image_fraction and rng.random() < spec.image_fraction:
        available = 1  # this sample trains as an image: one frame of the clip
    shapes = [s for s in spec.shapes if s.frames == 1] if available == 1 else spec.shapes
    shape = assign_bucket(shapes or spec.shapes, int(meta["width"]), int(meta["height"]), available)
    if shape is None:
        return None, TOO_SHORT
    try:
        video = decode_clip(raw["mp4"], shape, spec.fps, rng, spec.decoder)
    except ClipTooShort:
        return None, TOO_SHORT
    except UndecodableVideo as error:
        warn_once(key, "undecodable video %s (skipped, counted): %s", key, error)
        return None, UNDECODABLE
    shard = Path(raw.get("__url__", "?")).name
    tokens = shape.tokens(spec.patch_size, spec.temporal_factor, spec.spatial_factor)
    return PreparedClip(video, caption, key, shard, meta, tokens, tag), None


def make_loader(spec: LoaderSpec) -> torch.utils.data.DataLoader:
    # Workers are spawned, not forked: a fork would inherit the parent's Ray connection, which breaks.
    return torch.utils.data.DataLoader(
        ClipStream(spec), batch_size=None, num_workers=spec.num_workers, pin_memory=spec.pin_memory,
        persistent_workers=False, prefetch_factor=2 if spec.num_workers else None,
        multiprocessing_context="spawn" if spec.num_workers else None,
    )

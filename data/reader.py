"""Reading raw samples for one consumer: re-reading what a snapshot names, then the chunk it stood in,
then chunks the coordinator deals. Yields (raw sample or None, tag, error); a None sample is one the
shard could not give (a truncated or corrupt tar), with the shard's name as the error."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from data.batch import ChunkPosition, ConsumerSnapshot, Entry
from data.coordinator import CoordinatorClient, CoordinatorUnavailable, Tag
from data.storage import join, tar_samples

log = logging.getLogger(__name__)
_warned: set = set()

RawRead = Tuple[Optional[Dict[str, Any]], Tag, Optional[str]]


def warn_once(key: str, message: str, *args) -> None:
    """Each bad sample or shard is named once per process, not once per epoch."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def read_entries(root, entries: List[Entry]) -> Iterator[RawRead]:
    """Re-read specific samples by [epoch, chunk, offset, shard], in the order given."""
    wanted: Dict[str, Dict[int, List[Tag]]] = {}  # one offset can be wanted in several epochs
    for epoch, chunk, offset, shard in entries:
        wanted.setdefault(shard, {}).setdefault(offset, []).append((epoch, chunk, offset))
    found: Dict[Tag, Dict[str, Any]] = {}
    for shard, offsets in wanted.items():
        for offset, raw in enumerate(tar_samples(join(root, shard), handler=lambda error: False)):
            for tag in offsets.get(offset, ()):
                found[tag] = raw
            if offset >= max(offsets):
                break
    for epoch, chunk, offset, shard in entries:
        tag = (epoch, chunk, offset)
        yield (found[tag], tag, None) if tag in found else (None, tag, shard)


class ConsumerReader:
    """The raw samples of one consumer, in order, and where it stands: `position` (the chunk being read)
    and `unread_replay` (snapshot entries not yet re-read) are what a new snapshot records."""

    def __init__(self, root, coordinator: CoordinatorClient, name: str, slot: int, slots: int):
        self.root, self.coordinator = root, coordinator
        self.name, self.slot, self.slots = name, slot, slots
        self.position: Optional[ChunkPosition] = None
        self.unread_replay: List[Entry] = []

    def read(self, snapshot: Optional[ConsumerSnapshot], covered: Set[Tuple[int, int]] = frozenset()
             ) -> Iterator[RawRead]:
        """`covered`: the (epoch, chunk)s whose unread samples the snapshot (and the batches replayed before it)
        hold. The consumer first gives back the chunks it holds, to the front of its own slot in the order it got
        them: whatever it read past its snapshot (a prefetching worker, batches an epoch gate held) comes to it
        again, in the same order; the covered ones it passes over, as their samples are replayed."""
        try:
            self.coordinator.release(self.name, dead=False)
        except CoordinatorUnavailable as error:
            warn_once("coordinator", "%s: %s; no further chunks", self.name, error)
            return
        if snapshot is not None:
            self.position = snapshot.current and ChunkPosition(dict(snapshot.current.work), snapshot.current.next)
            self.unread_replay = [list(e) for e in snapshot.buffer]
            for read in read_entries(self.root, snapshot.buffer):  # what sat in the packer, in order
                self.unread_replay.pop(0)
                yield read
            if snapshot.current is not None:
                yield from self.read_chunk(snapshot.current.work, snapshot.current.next)
        while True:
            try:
                work = self.coordinator.request(self.name, self.slot, self.slots)
            except CoordinatorUnavailable as error:
                # No more work can be dealt (a stop signal reached the coordinator's cluster too): the stream
                # ends after what was read, so the step in progress can finish and checkpoint without it.
                warn_once("coordinator", "%s: %s; no further chunks", self.name, error)
                return
            if (work["epoch"], work["chunk"]) in covered:
                covered = covered - {(work["epoch"], work["chunk"])}  # handed again once, now leased to it anew
                continue
            yield from self.read_chunk(work)

    def read_chunk(self, work: Dict[str, Any], first: int = 0) -> Iterator[RawRead]:
        epoch, chunk, start, stop = work["epoch"], work["chunk"], work["start"], work["stop"]
        skip = set(work["skip"])
        errors: List[str] = []

        def note(error: Exception) -> bool:
            errors.append(f"{type(error).__name__}: {error}")
            return False  # stop reading this shard

        begin = max(start, first)
        self.position = ChunkPosition(work, begin)
        offset = 0
        for raw in tar_samples(join(self.root, work["shard"]), handler=note):
            if offset >= stop:
                break
            if offset >= begin and offset not in skip:
                self.position.next = offset + 1
                yield raw, (epoch, chunk, offset), None
            offset += 1
        if offset < stop:  # the tar ended or broke before the manifest's count: those samples are lost
            detail = errors[0] if errors else "fewer samples than the manifest lists"
            warn_once(work["shard"], "corrupt shard %s (samples from %d on skipped, counted): %s",
                      work["shard"], max(offset, begin), detail)
            for missing in range(max(offset, begin), stop):
                if missing not in skip:
                    self.position.next = missing + 1
                    yield None, (epoch, chunk, missing), work["shard"]
        self.position = None

    def open_position(self) -> Optional[ChunkPosition]:
        """The current chunk's position, unless every sample of it has been read."""
        if self.position is None or self.position.finished:
            return None
        return ChunkPosition(self.position.work, self.position.next)

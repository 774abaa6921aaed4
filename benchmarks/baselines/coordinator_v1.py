"""BASELINE for benchmarks/coordinator_scale.py: the coordinator core as it was before issue 28 (quadratic deal,
scanning acks): its core classes kept verbatim to measure against (the client and the Ray actor are left out).
Not used by Kino.

The data coordinator: who reads what, and what has been trained.

The core is plain Python (single-process runs use it in-process); `RayCoordinator` serves the
same object as a named Ray actor that every rank and loader worker talks to.

Work is handed out in chunks (a sample range of one shard) from a seeded per-epoch plan.
Trainers acknowledge every sample they trained on (or dropped) after each optimizer step,
and a checkpoint saves `state()`: the acknowledged samples of the open epochs, nothing
else. `restore(state)` on any number of ranks hands out exactly the rest: no sample is
trained twice in an epoch, none is skipped, and samples that were in flight when the
checkpoint was taken are replayed. A consumer that dies has its unfinished chunks handed to
others (`release`, or lease expiry). Epochs overlap: a consumer that runs out of work in
epoch e starts epoch e+1 rather than waiting (waiting would stall every rank's all-reduce).
"""
from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple

Tag = Tuple[int, int, int]  # (epoch, chunk id, sample offset within the shard)


@dataclass(frozen=True)
class Chunk:
    id: int
    shard: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def make_chunks(shards: Sequence[Tuple[str, int]], chunk_samples: Optional[int]) -> List[Chunk]:
    """Split (shard, sample count) rows into chunks of at most `chunk_samples` (None: one per shard)."""
    chunks: List[Chunk] = []
    for shard, count in sorted(shards):
        step = chunk_samples or max(count, 1)
        for start in range(0, count, step):
            chunks.append(Chunk(len(chunks), shard, start, min(count, start + step)))
    return chunks


class _Epoch:
    def __init__(self, epoch: int, chunks: List[Chunk], seed: int):
        self.epoch = epoch
        self.order = [c.id for c in chunks]
        random.Random(f"{seed}/{epoch}").shuffle(self.order)
        self.undealt: List[int] = list(self.order)  # in plan order; dealt to slots on first request
        self.slots: Optional[int] = None
        self.queues: Dict[int, Deque[int]] = {}
        self.orphans: Deque[int] = deque()  # chunks of consumers that died: whoever asks first
        self.done: Dict[int, Set[int]] = {}

    def deal(self, slots: int) -> None:
        """Split what is left round-robin over `slots` consumers: the same data for the same world. Each epoch's
        deal starts where the one before it ended (at slot epoch x chunks, mod slots): a slot dealt one chunk fewer
        goes first in the next epoch, and with fewer chunks than consumers every consumer has a share within
        slots / chunks epochs. With chunks a multiple of slots, every deal starts at slot 0."""
        if self.slots == slots:
            return
        remaining = [c for q in sorted(self.queues) for c in self.queues[q]] + self.undealt
        remaining.sort(key=self.order.index)
        first = (self.epoch * len(self.order)) % slots
        self.slots, self.undealt = slots, []
        self.queues = {slot: deque(remaining[(slot - first) % slots::slots]) for slot in range(slots)}

    def complete(self, chunks: List[Chunk]) -> bool:
        return all(len(self.done.get(c.id, ())) >= c.size for c in chunks)


class CoordinatorCore:
    def __init__(self, shards: Sequence[Tuple[str, int]], seed: int = 0, chunk_samples: Optional[int] = None,
                 lease_timeout_s: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.chunks = make_chunks(shards, chunk_samples)
        if not self.chunks:
            raise ValueError("the dataset has no samples")
        self.seed = seed
        self.chunk_samples = chunk_samples
        self.lease_timeout_s = lease_timeout_s
        self.clock = clock  # tests pass their own, to expire leases without waiting
        self.epochs: Dict[int, _Epoch] = {0: _Epoch(0, self.chunks, seed)}
        self.completed_epochs = 0
        # (epoch, chunk) -> (consumer, slot, last seen)
        self.leases: Dict[Tuple[int, int], Tuple[str, int, float]] = {}
        self.slot_of: Dict[str, int] = {}

    # -- handing out work -----------------------------------------------------------------------
    def request(self, consumer: str, slot: int = 0, slots: int = 1) -> Dict[str, Any]:
        """The next chunk for `consumer` (slot `slot` of `slots` consumers), with the offsets inside it
        already acknowledged. Orphaned chunks first, then the slot's own deal, oldest epoch first."""
        self._expire_stale_leases()
        self.slot_of[consumer] = slot
        # Fewer chunks than consumers leave a slot without a share in some epochs: it opens the next until one
        # deals it a chunk, which the rotating deal (_Epoch.deal) does within slots / chunks epochs.
        for _ in range(slots + 1):
            for epoch_id in sorted(self.epochs):
                epoch = self.epochs[epoch_id]
                epoch.deal(slots)
                for queue in (epoch.orphans, epoch.queues[slot]):
                    while queue:
                        chunk_id = queue.popleft()
                        if len(epoch.done.get(chunk_id, ())) < self.chunks[chunk_id].size:
                            return self._lease(epoch, chunk_id, consumer, slot)
            # This slot's share of every open epoch is out: begin its share of the next epoch.
            new_id = max(self.epochs) + 1
            self.epochs[new_id] = _Epoch(new_id, self.chunks, self.seed)
        raise RuntimeError(f"data coordinator: slot {slot} of {slots} got no chunk in {slots + 1} new epochs "
                           f"({len(self.chunks)} chunk(s)); this is a bug in Kino")

    def _lease(self, epoch: _Epoch, chunk_id: int, consumer: str, slot: int) -> Dict[str, Any]:
        chunk = self.chunks[chunk_id]
        self.leases[(epoch.epoch, chunk_id)] = (consumer, slot, self.clock())
        return {"epoch": epoch.epoch, "chunk": chunk_id, "shard": chunk.shard, "start": chunk.start,
                "stop": chunk.stop, "skip": sorted(epoch.done.get(chunk_id, ()))}

    # -- acknowledgements -------------------------------------------------------------------------
    def ack(self, tags: Iterable[Sequence[int]], consumer: Optional[str] = None) -> None:
        """Samples trained on (or dropped for good) by a completed optimizer step."""
        now = self.clock()
        for epoch_id, chunk_id, offset in tags:
            epoch = self.epochs.get(epoch_id)
            if epoch is None:  # an epoch already closed: nothing left to record
                continue
            done = epoch.done.setdefault(chunk_id, set())
            done.add(offset)
            if len(done) >= self.chunks[chunk_id].size:
                self.leases.pop((epoch_id, chunk_id), None)
        if consumer is not None:
            for key, (holder, slot, _) in list(self.leases.items()):
                if holder == consumer:
                    self.leases[key] = (holder, slot, now)
        self._close_finished_epochs()

    def _close_finished_epochs(self) -> None:
        for epoch_id in sorted(self.epochs):
            epoch = self.epochs[epoch_id]
            if not epoch.complete(self.chunks):
                break
            del self.epochs[epoch_id]
            self.completed_epochs += 1
            if not self.epochs:  # keep one epoch open, so state() always says where the data stands
                self.epochs[epoch_id + 1] = _Epoch(epoch_id + 1, self.chunks, self.seed)

    # -- failures and stage changes --------------------------------------------------------------
    def release(self, consumer: str, dead: bool = True) -> int:
        """Give back a consumer's unfinished chunks. A dead consumer's go to whoever asks next; a live
        one's (a loader rebuilt for a new curriculum stage) return to the front of its own slot."""
        released = 0
        for (epoch_id, chunk_id), (holder, slot, _) in sorted(self.leases.items(), reverse=True):
            if holder != consumer:
                continue
            del self.leases[(epoch_id, chunk_id)]
            epoch = self.epochs.get(epoch_id)
            if epoch is None:
                continue
            if dead or epoch.slots is None or slot not in epoch.queues:
                epoch.orphans.appendleft(chunk_id)
            else:
                epoch.queues[slot].appendleft(chunk_id)
            released += 1
        slot = self.slot_of.get(consumer)
        if dead and slot is not None:  # its share not yet handed out goes to the others too
            for epoch in self.epochs.values():
                queue = epoch.queues.get(slot)
                while queue:
                    epoch.orphans.append(queue.popleft())
                    released += 1
        return released

    def _expire_stale_leases(self) -> None:
        now = self.clock()
        stale = {holder for holder, _, seen in self.leases.values() if now - seen > self.lease_timeout_s}
        for holder in stale:
            self.release(holder, dead=True)

    # -- checkpointing ---------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        return {
            "seed": self.seed, "chunk_samples": self.chunk_samples, "completed_epochs": self.completed_epochs,
            "chunks": [[c.shard, c.start, c.stop] for c in self.chunks],
            "epochs": {str(e.epoch): {"done": {str(c): sorted(s) for c, s in e.done.items() if s},
                                      "slots": e.slots, "undealt": list(e.undealt), "orphans": list(e.orphans),
                                      "queues": {str(k): list(q) for k, q in e.queues.items()}}
                       for e in self.epochs.values()},
        }

    def restore(self, state: Dict[str, Any], slots: Optional[int] = None) -> None:
        """Continue from a checkpoint. With the same number of consumer slots the deal is restored as it
        was (each loader resumes from its own snapshot: bit-exact); with another number, every chunk not
        fully acknowledged is dealt out again in plan order (exactly-once, not bit-exact)."""
        saved_chunks = [tuple(c) for c in state["chunks"]]
        if saved_chunks != [(c.shard, c.start, c.stop) for c in self.chunks]:
            raise ValueError("the dataset's shards differ from the checkpoint's data plan "
                             "(same data.root and data.chunk_samples are needed to resume exactly)")
        self.completed_epochs = int(state["completed_epochs"])
        self.leases.clear()
        self.epochs = {}
        for epoch_key, saved in sorted(state["epochs"].items(), key=lambda kv: int(kv[0])):
            epoch = _Epoch(int(epoch_key), self.chunks, self.seed)
            epoch.done = {int(c): set(offsets) for c, offsets in saved["done"].items()}
            if slots is not None and saved.get("slots") in (slots, None) and "queues" in saved:
                epoch.slots = saved["slots"]
                epoch.undealt = list(saved["undealt"])
                epoch.orphans = deque(saved["orphans"])
                epoch.queues = {int(k): deque(q) for k, q in saved["queues"].items()}
            else:
                epoch.undealt = [c for c in epoch.order if len(epoch.done.get(c, ())) < self.chunks[c].size]
            self.epochs[epoch.epoch] = epoch
        if not self.epochs:
            self.epochs[0] = _Epoch(0, self.chunks, self.seed)

    def summary(self) -> Dict[str, Any]:
        return {"completed_epochs": self.completed_epochs, "open_epochs": sorted(self.epochs),
                "leases": len(self.leases)}

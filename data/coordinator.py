"""The data coordinator: who reads what, and what has been trained.

The core is plain Python (single-process runs use it in-process); `RayCoordinator` serves the
same object as a named Ray actor that every rank and loader worker talks to.

Work is handed out in chunks (a sample range of one shard) from a seeded per-epoch plan.
Trainers acknowledge every sample they trained on (or dropped) after each optimizer step,
and a checkpoint saves `state()`: what the open epochs have finished and dealt, and the leases,
nothing else. `restore(state)` on any number of ranks hands out exactly the rest: no sample is
trained twice in an epoch, none is skipped, and samples that were in flight when the
checkpoint was taken are replayed (a consumer's snapshot stands at its last trained batch, the plan at the
last chunk dealt: the chunks between are its leases, given back to it when its reader starts). A consumer
that dies has its unfinished chunks handed to others (`release`, or lease expiry). One that runs out of work
in epoch e is dealt from e+1 rather than made to wait (with work stealing it first takes the last chunks of the
slowest consumers' shares); the trainer's epoch gate (data.strict_epochs) decides what trains when.

Every step costs at most O(log n) in chunks and consumers, and a deal O(chunks log chunks), so the same core
serves a demo and a billion clips (BENCHMARKS.md, "Data coordinator at scale"): chunks are numpy columns, an
epoch's plan a permutation array, each slot's share a stride over one array with a cursor at each end, finished
chunks a bitmap with a count, leases indexed by consumer, and stale leases found from a heap ordered by when
their consumer was last heard from.
"""
from __future__ import annotations

import base64
from array import array
import heapq
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np

Tag = Tuple[int, int, int]  # (epoch, chunk id, sample offset within the shard)
STATE_FORMAT = 2


@dataclass(frozen=True)
class Chunk:
    id: int
    shard: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class ChunkTable:
    """Every chunk of a dataset as numpy columns (shard index, start, stop): 10M chunks are 240 MB of arrays,
    not 10M Python objects. Indexing gives a Chunk."""

    def __init__(self, shards: Sequence[Tuple[str, int]], chunk_samples: Optional[int]):
        rows = sorted(shards)
        self.shard_names = [str(name) for name, _ in rows]
        counts = np.array([int(count) for _, count in rows], dtype=np.int64)
        steps = np.full(len(rows), int(chunk_samples), dtype=np.int64) if chunk_samples else np.maximum(counts, 1)
        per_shard = -(-counts // steps)  # ceil; an empty shard has no chunk
        self.shard = np.repeat(np.arange(len(rows), dtype=np.int64), per_shard)
        first_of_shard = np.repeat(np.cumsum(per_shard) - per_shard, per_shard)
        within = np.arange(len(self.shard), dtype=np.int64) - first_of_shard
        step = np.repeat(steps, per_shard)
        self.start = within * step
        self.stop = np.minimum(self.start + step, np.repeat(counts, per_shard))
        self.sizes = self.stop - self.start
        self.size_of = array("q", self.sizes.tobytes())  # scalar reads at Python speed (acknowledgements)

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, index: int) -> Chunk:
        return Chunk(int(index), self.shard_names[self.shard[index]], int(self.start[index]), int(self.stop[index]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def rows(self) -> List[List[Any]]:
        return [[self.shard_names[s], int(a), int(b)] for s, a, b in zip(self.shard, self.start, self.stop)]

    def fingerprint(self) -> str:
        """Identifies the plan's chunks (shards, their order and sizes) without listing them."""
        import hashlib

        digest = hashlib.sha256("\n".join(self.shard_names).encode())
        for column in (self.shard, self.start, self.stop):
            digest.update(np.ascontiguousarray(column).tobytes())
        return digest.hexdigest()


def make_chunks(shards: Sequence[Tuple[str, int]], chunk_samples: Optional[int]) -> List[Chunk]:
    """Split (shard, sample count) rows into chunks of at most `chunk_samples` (None: one per shard)."""
    return list(ChunkTable(shards, chunk_samples))


def _pack_bits(mask: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.packbits(mask).tobytes(), 6)).decode()


def _unpack_bits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8))[:n].astype(bool)


def _ranges(offsets: Iterable[int]) -> List[List[int]]:
    """Sorted offsets as [start, stop) runs: a chunk read in order is one pair however many samples it holds."""
    runs: List[List[int]] = []
    for offset in sorted(offsets):
        if runs and runs[-1][1] == offset:
            runs[-1][1] += 1
        else:
            runs.append([offset, offset + 1])
    return runs


class _Epoch:
    """One epoch's plan (a seeded permutation of the chunks), its deal over the consumer slots and what of it is
    finished. Slot s's share is the stride pool[offset_s + slots * k] for heads[s] <= k < tails[s], where the pool
    is the plan order of what was open when it was dealt; chunks given back go to a slot's `front` or `orphans`."""

    def __init__(self, epoch: int, chunks: ChunkTable, seed: int):
        self.epoch = epoch
        self.chunks = chunks
        self.order = np.random.Generator(np.random.PCG64([int(seed) & 0xFFFFFFFF, epoch])).permutation(len(chunks))
        self._set_finished(np.zeros(len(chunks), dtype=bool))
        self.partial: Dict[int, Set[int]] = {}  # chunk -> acknowledged offsets, for chunks begun and not finished
        self.slots: Optional[int] = None
        self.pool = self.order
        self.pool_excluded: Optional[np.ndarray] = None  # open-at-deal complement, for state(); None = nothing
        self.first = 0
        self.heads = self.tails = np.zeros(0, dtype=np.int64)
        self._most_left: List[Tuple[int, int]] = []
        self.front: Dict[int, Deque[int]] = {}
        self.orphans: Deque[int] = deque()

    def _set_finished(self, mask: np.ndarray) -> None:
        """`done` (a bytearray: a scalar read or write at Python speed, unlike a numpy element) and `finished`, a
        numpy view of the same bytes for whole-plan operations."""
        self.done = bytearray(np.ascontiguousarray(mask, dtype=bool).tobytes())
        self.finished = np.frombuffer(self.done, dtype=bool)
        self.finished_count = int(self.finished.sum())

    @property
    def complete(self) -> bool:
        return self.finished_count == len(self.chunks)

    def deal(self, slots: int, leased: Set[int]) -> None:
        """Split what is open (not finished, not leased) round-robin over `slots` consumers, in plan order: the
        same data for the same world. Each epoch's deal starts where the one before it ended (at slot epoch x
        chunks, mod slots): a slot dealt one chunk fewer goes first in the next epoch, and with fewer chunks than
        consumers every consumer has a share within slots / chunks epochs. O(chunks)."""
        if self.slots == slots:
            return
        excluded = self.finished.copy()
        if leased:
            excluded[np.fromiter(leased, dtype=np.int64, count=len(leased))] = True
        self._set_deal(slots, (self.epoch * len(self.chunks)) % slots, excluded if excluded.any() else None)
        self.heads = np.zeros(slots, dtype=np.int64)
        self.front, self.orphans = {}, deque()
        self._index_shares()

    def _index_shares(self) -> None:
        """A max-heap of (-chunks left, slot), for work stealing; entries go stale as slots take their chunks
        (a count only falls) and are put right when they come to the top."""
        self._most_left = [(-int(t - h), s) for s, (h, t) in enumerate(zip(self.heads, self.tails)) if t > h]
        heapq.heapify(self._most_left)

    def steal(self) -> Optional[int]:
        """For a consumer done with its own share: the last chunk of the slot with the most left. Done before
        opening a new epoch, this keeps the consumers within a chunk or so of each other in every epoch, however
        unevenly they read. O(log slots)."""
        heap = self._most_left
        while heap:
            recorded, slot = heap[0]
            left = int(self.tails[slot] - self.heads[slot])
            if -recorded != left:  # stale: the slot took chunks since
                heapq.heapreplace(heap, (-left, slot)) if left > 0 else heapq.heappop(heap)
                continue
            self.tails[slot] -= 1
            chunk = int(self.pool[self._offset(slot) + self.slots * self.tails[slot]])
            heapq.heapreplace(heap, (-(left - 1), slot)) if left > 1 else heapq.heappop(heap)
            if not self.done[chunk]:
                return chunk
        return None

    def _set_deal(self, slots: int, first: int, excluded: Optional[np.ndarray]) -> None:
        self.slots, self.first, self.pool_excluded = slots, first, excluded
        self.pool = self.order if excluded is None else self.order[~excluded[self.order]]
        offsets = (np.arange(slots, dtype=np.int64) - first) % slots
        self.tails = np.maximum(0, -(-(len(self.pool) - offsets) // slots))  # entries of each stride

    def _offset(self, slot: int) -> int:
        return (slot - self.first) % self.slots

    def pop(self, slot: int) -> Optional[int]:
        """The next open chunk of `slot`'s share (its given-back chunks first), or None when it has none."""
        front = self.front.get(slot)
        while front:
            chunk = front.popleft()
            if not self.done[chunk]:
                return chunk
        while self.heads[slot] < self.tails[slot]:
            chunk = int(self.pool[self._offset(slot) + self.slots * self.heads[slot]])
            self.heads[slot] += 1
            if not self.done[chunk]:
                return chunk
        return None

    def pop_orphan(self) -> Optional[int]:
        while self.orphans:
            chunk = self.orphans.popleft()
            if not self.done[chunk]:
                return chunk
        return None

    def drain(self, slot: int) -> List[int]:
        """Everything `slot` still holds in this epoch (a dead consumer's share), taken out of its queues."""
        taken = self.share(slot)
        self.front.pop(slot, None)
        if self._has_slot(slot):
            self.heads[slot] = self.tails[slot]
        return taken

    def acknowledge(self, chunk: int, offset: int) -> bool:
        """Record one sample; True when it finished its chunk."""
        if self.done[chunk]:
            return False
        done = self.partial.setdefault(chunk, set())
        done.add(offset)
        if len(done) < self.chunks.size_of[chunk]:
            return False
        del self.partial[chunk]
        self.done[chunk] = 1
        self.finished_count += 1
        return True

    def _has_slot(self, slot: int) -> bool:
        return self.slots is not None and 0 <= slot < self.slots

    def share(self, slot: int) -> List[int]:
        """What `slot` would be handed next in this epoch, in order: its given-back chunks, then its stride."""
        stride = []
        if self._has_slot(slot):
            positions = self._offset(slot) + self.slots * np.arange(self.heads[slot], self.tails[slot])
            stride = [int(c) for c in self.pool[positions]]
        return [c for c in [*self.front.get(slot, ()), *stride] if not self.done[c]]

    def skip(self, chunk: int) -> List[int]:
        if self.done[chunk]:
            return list(range(int(self.chunks.start[chunk]), int(self.chunks.stop[chunk])))
        return sorted(self.partial.get(chunk, ()))

    # -- checkpoint form: sized by chunks, not by samples ----------------------------------------------------------
    def to_state(self) -> Dict[str, Any]:
        state = {"finished": _pack_bits(self.finished), "finished_count": self.finished_count,
                 "partial": {str(c): _ranges(s) for c, s in self.partial.items() if s}, "slots": self.slots}
        if self.slots is not None:
            state.update(first=self.first, heads=self.heads.tolist(), tails=self.tails.tolist(),
                         pool_excluded=None if self.pool_excluded is None else _pack_bits(self.pool_excluded),
                         front={str(s): list(q) for s, q in self.front.items() if q}, orphans=list(self.orphans))
        return state

    def load(self, saved: Dict[str, Any], keep_deal: bool) -> None:
        n = len(self.chunks)
        if "finished" in saved:
            self._set_finished(_unpack_bits(saved["finished"], n))
            self.partial = {int(c): {o for a, b in runs for o in range(a, b)} for c, runs in saved["partial"].items()}
        else:  # a checkpoint of the first format: every acknowledged offset of every chunk
            finished = np.zeros(n, dtype=bool)
            for chunk, offsets in saved["done"].items():
                chunk = int(chunk)
                if len(offsets) >= self.chunks.size_of[chunk]:
                    finished[chunk] = True
                elif offsets:
                    self.partial[chunk] = set(offsets)
            self._set_finished(finished)
        if not keep_deal or saved.get("slots") is None:
            return
        slots = int(saved["slots"])
        if "heads" in saved:
            excluded = saved.get("pool_excluded")
            self._set_deal(slots, int(saved["first"]), None if excluded is None else _unpack_bits(excluded, n))
            self.heads = np.array(saved["heads"], dtype=np.int64)
            self.tails = np.array(saved["tails"], dtype=np.int64)
            self.front = {int(s): deque(q) for s, q in saved["front"].items()}
            self._index_shares()
        else:  # first format: each slot's queue as a list; they become the slots' given-back fronts
            self._set_deal(slots, 0, np.ones(n, dtype=bool))
            self.heads = np.zeros(slots, dtype=np.int64)
            self.front = {int(s): deque(q) for s, q in saved["queues"].items()}
            self.front.setdefault(0, deque()).extend(saved.get("undealt", []))
            self._index_shares()
        self.orphans = deque(saved.get("orphans", []))


class CoordinatorCore:
    def __init__(self, shards: Sequence[Tuple[str, int]], seed: int = 0, chunk_samples: Optional[int] = None,
                 lease_timeout_s: float = 600.0, clock: Callable[[], float] = time.monotonic,
                 work_stealing: bool = False):
        self.chunks = ChunkTable(shards, chunk_samples)
        self.work_stealing = work_stealing
        if not len(self.chunks):
            raise ValueError("the dataset has no samples")
        self.seed = seed
        self.chunk_samples = chunk_samples
        self.lease_timeout_s = lease_timeout_s
        self.clock = clock  # tests pass their own, to expire leases without waiting
        self.epochs: Dict[int, _Epoch] = {0: _Epoch(0, self.chunks, seed)}
        self.completed_epochs = 0
        self.leases: Dict[Tuple[int, int], Tuple[str, int]] = {}  # (epoch, chunk) -> (consumer, slot)
        # consumer -> its leases, in the order it was handed them (dict keys: an ordered set)
        self.held: Dict[str, Dict[Tuple[int, int], None]] = {}
        self.last_seen: Dict[str, float] = {}  # consumer -> when it last requested or acknowledged
        self._expiry: List[Tuple[float, str]] = []  # heap of (last seen, consumer); stale entries skipped
        self.slot_of: Dict[str, int] = {}

    # -- handing out work -----------------------------------------------------------------------
    def request(self, consumer: str, slot: int = 0, slots: int = 1) -> Dict[str, Any]:
        """The next chunk for `consumer` (slot `slot` of `slots` consumers), with the offsets inside it
        already acknowledged. Oldest epoch first: its orphaned chunks, then the slot's own share, then (with
        work_stealing) the last chunk of the slot with the most left; a new epoch only when the open ones have
        nothing left for it. Stealing keeps consumers within what is in flight of each other, at the price of a
        data order that depends on timing."""
        self._expire_stale_leases()
        self.slot_of[consumer] = slot
        self._seen(consumer)
        # Fewer chunks than consumers leave a slot without a share in some epochs: it opens the next until one
        # deals it a chunk, which the rotating deal (_Epoch.deal) does within slots / chunks epochs.
        for _ in range(slots + 1):
            for epoch_id in sorted(self.epochs):
                epoch = self.epochs[epoch_id]
                if epoch.slots != slots:  # its first deal, or a new number of consumers
                    epoch.deal(slots, self._leased_in(epoch_id))
                chunk = epoch.pop_orphan()
                if chunk is None:
                    chunk = epoch.pop(slot)
                if chunk is None and self.work_stealing:  # its share is out: help the slowest first
                    chunk = epoch.steal()
                if chunk is not None:
                    return self._lease(epoch, chunk, consumer, slot)
            # This slot's share of every open epoch is out: begin its share of the next epoch.
            new_id = max(self.epochs) + 1
            self.epochs[new_id] = _Epoch(new_id, self.chunks, self.seed)
        raise RuntimeError(f"data coordinator: slot {slot} of {slots} got no chunk in {slots + 1} new epochs "
                           f"({len(self.chunks)} chunk(s)); this is a bug in Kino")

    def _leased_in(self, epoch_id: int) -> Set[int]:
        """Chunks of an epoch under lease; only a deal asks (once per epoch and number of consumers)."""
        return {chunk for (e, chunk) in self.leases if e == epoch_id}

    def _lease(self, epoch: _Epoch, chunk_id: int, consumer: str, slot: int) -> Dict[str, Any]:
        chunk = self.chunks[chunk_id]
        key = (epoch.epoch, chunk_id)
        self._drop_lease(key)
        self.leases[key] = (consumer, slot)
        self.held.setdefault(consumer, {})[key] = None
        return {"epoch": epoch.epoch, "chunk": chunk_id, "shard": chunk.shard, "start": chunk.start,
                "stop": chunk.stop, "skip": epoch.skip(chunk_id)}

    def _drop_lease(self, key: Tuple[int, int]) -> None:
        holder = self.leases.pop(key, None)
        if holder is not None:
            held = self.held.get(holder[0])
            if held is not None:
                held.pop(key, None)

    def _seen(self, consumer: str) -> None:
        """O(1): the heap holds one entry per consumer, moved on lazily when it comes up (_expire_stale_leases)."""
        if consumer not in self.last_seen:
            heapq.heappush(self._expiry, (self.clock(), consumer))
        self.last_seen[consumer] = self.clock()

    # -- acknowledgements -------------------------------------------------------------------------
    def ack(self, tags: Iterable[Sequence[int]], consumer: Optional[str] = None) -> None:
        """Samples trained on (or dropped for good) by a completed optimizer step. O(samples) and no scan."""
        closed = False
        for epoch_id, chunk_id, offset in tags:
            epoch = self.epochs.get(epoch_id)
            if epoch is None:  # an epoch already closed: nothing left to record
                continue
            if epoch.acknowledge(chunk_id, offset):
                self._drop_lease((epoch_id, chunk_id))
                closed = closed or epoch.complete
        if consumer is not None:
            self._seen(consumer)
        if closed:
            self._close_finished_epochs()

    def ack_step(self, by_consumer: Dict[str, List[Sequence[int]]]) -> None:
        """One optimizer step of one rank: each of its consumers' tags, in one call (one Ray round trip)."""
        for consumer, tags in by_consumer.items():
            self.ack(tags, consumer)

    def _close_finished_epochs(self) -> None:
        for epoch_id in sorted(self.epochs):
            epoch = self.epochs[epoch_id]
            if not epoch.complete:
                break
            del self.epochs[epoch_id]  # every chunk finished, so none of it is leased (ack dropped each lease)
            self.completed_epochs += 1
            if not self.epochs:  # keep one epoch open, so state() always says where the data stands
                self.epochs[epoch_id + 1] = _Epoch(epoch_id + 1, self.chunks, self.seed)

    # -- failures and stage changes --------------------------------------------------------------
    def release(self, consumer: str, dead: bool = True) -> int:
        """Give back a consumer's unfinished chunks. A dead consumer's go to whoever asks next; a live
        one's (a reader starting over from its snapshot: a resume, a new curriculum stage) return to the front of
        its own slot in the order it was handed them, so it reads them again in that order."""
        released = 0
        for key in reversed(list(self.held.pop(consumer, {}))):
            holder = self.leases.pop(key, None)
            if holder is None or holder[0] != consumer:
                continue
            epoch_id, chunk_id = key
            slot = holder[1]
            epoch = self.epochs.get(epoch_id)
            if epoch is None:
                continue
            if dead or epoch.slots is None or not 0 <= slot < epoch.slots:
                epoch.orphans.appendleft(chunk_id)
            else:
                epoch.front.setdefault(slot, deque()).appendleft(chunk_id)
            released += 1
        slot = self.slot_of.get(consumer)
        if dead and slot is not None:  # its share not yet handed out goes to the others too
            for epoch in self.epochs.values():
                taken = epoch.drain(slot)
                epoch.orphans.extend(taken)
                released += len(taken)
        if dead:
            self.last_seen.pop(consumer, None)
        return released

    def _expire_stale_leases(self) -> None:
        """Consumers silent for longer than the lease lose their chunks: the oldest first, from the heap."""
        cutoff = self.clock() - self.lease_timeout_s
        while self._expiry and self._expiry[0][0] < cutoff:
            _, consumer = heapq.heappop(self._expiry)
            seen = self.last_seen.get(consumer)
            if seen is None:
                continue  # released since
            if seen >= cutoff:  # heard from since its entry was made: the entry moves on to that time
                heapq.heappush(self._expiry, (seen, consumer))
            elif self.held.get(consumer):
                self.release(consumer, dead=True)
            else:
                self.last_seen.pop(consumer, None)

    # -- checkpointing ---------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        """What a resume needs, sized by chunks and chunks in flight, not by samples trained: per open epoch a
        compressed bitmap of finished chunks, the acknowledged offsets of begun ones as runs, and the deal; and the
        leases, each consumer's in the order it was handed them: a consumer may have read ahead of the batch its
        snapshot stands at (prefetching workers, batches held for an older epoch), and what it read past that
        batch it reads again, from its leases (`release(consumer, dead=False)` when its reader starts)."""
        leases = [[e, c, consumer, self.leases[(e, c)][1]] for consumer, held in self.held.items() for e, c in held
                  if self.leases.get((e, c), (None,))[0] == consumer]
        return {"leases": leases, "format": STATE_FORMAT, "seed": self.seed, "chunk_samples": self.chunk_samples,
                "completed_epochs": self.completed_epochs, "num_chunks": len(self.chunks),
                "chunks_sha256": self.chunks.fingerprint(),
                "epochs": {str(e.epoch): e.to_state() for e in self.epochs.values()}}

    def restore(self, state: Dict[str, Any], slots: Optional[int] = None) -> None:
        """Continue from a checkpoint. With the same number of consumer slots the deal is restored as it
        was (each loader resumes from its own snapshot: bit-exact); with another number, every chunk not
        fully acknowledged is dealt out again in plan order (exactly-once, not bit-exact)."""
        if "chunks" in state:  # the first format listed them
            same = [tuple(c) for c in state["chunks"]] == [tuple(r) for r in self.chunks.rows()]
        else:
            same = state.get("chunks_sha256") == self.chunks.fingerprint()
        if not same:
            raise ValueError("the dataset's shards differ from the checkpoint's data plan "
                             "(same data.root and data.chunk_samples are needed to resume exactly)")
        self.completed_epochs = int(state["completed_epochs"])
        self.leases.clear()
        self.held.clear()
        self.epochs = {}
        for epoch_key, saved in sorted(state["epochs"].items(), key=lambda kv: int(kv[0])):
            epoch = _Epoch(int(epoch_key), self.chunks, self.seed)
            epoch.load(saved, keep_deal=slots is not None and saved.get("slots") in (slots, None))
            self.epochs[epoch.epoch] = epoch
        for epoch_id, chunk_id, consumer, slot in state.get("leases", []):  # under the same deal only: else it
            epoch = self.epochs.get(epoch_id)                                 # re-deals every unfinished chunk
            if slots is not None and epoch is not None and epoch.slots == slots and not epoch.done[chunk_id]:
                self.leases[(epoch_id, chunk_id)] = (consumer, slot)
                self.held.setdefault(consumer, {})[(epoch_id, chunk_id)] = None
                self.slot_of[consumer] = slot
                self._seen(consumer)
        if not self.epochs:
            self.epochs[0] = _Epoch(0, self.chunks, self.seed)

    def summary(self) -> Dict[str, Any]:
        return {"completed_epochs": self.completed_epochs, "open_epochs": sorted(self.epochs),
                "leases": len(self.leases)}


class CoordinatorUnavailable(RuntimeError):
    """The coordinator's actor cannot be reached (its Ray cluster stopped, e.g. a preemption signalled every
    process). The trainer keeps what its checkpoint needs without it (train/data_plane.py, `mirrored_state`)."""


def mirrored_state(shards: Sequence[Tuple[str, int]], seed: int, chunk_samples: Optional[int],
                   base: Optional[Dict[str, Any]], acknowledged: Iterable[Sequence[int]]) -> Dict[str, Any]:
    """The coordinator's state rebuilt without it: `base` (its state at the last checkpoint, or None for the
    start) plus every sample acknowledged since. It keeps what exactly-once needs (the acknowledged samples of
    the open epochs) and no deal: a resume from it deals the rest out anew."""
    core = CoordinatorCore(shards, seed, chunk_samples)
    if base is not None:
        core.restore(base, None)
    tags = [list(t) for t in acknowledged]
    open_from = min(core.epochs)
    for epoch_id in sorted({t[0] for t in tags}):
        if epoch_id >= open_from and epoch_id not in core.epochs:  # begun after `base` was taken
            core.epochs[epoch_id] = _Epoch(epoch_id, core.chunks, seed)
    core.ack(tags)
    state = core.state()
    state["mirrored"] = True
    return state


IDEMPOTENT_CALLS = ("ack", "ack_step", "state", "summary")  # the same call twice has the effect of one


class CoordinatorClient:
    """What loaders and trainers hold: the in-process core, or a named Ray actor that every process
    (ranks and DataLoader workers, on any node) reaches by cluster address and name."""

    call_timeout_s = 60.0
    call_attempts = 3

    def __init__(self, core: Optional[CoordinatorCore] = None, ray_address: Optional[str] = None,
                 actor_name: Optional[str] = None, namespace: Optional[str] = None):
        self._core = core
        self.ray_address, self.actor_name, self.namespace = ray_address, actor_name, namespace
        self._actor = None

    @property
    def uses_ray(self) -> bool:
        return self._core is None

    def __getstate__(self):
        if self._core is not None:
            raise RuntimeError("an in-process coordinator cannot be shared with worker processes: "
                               "use data.coordinator=ray (or data.num_workers=0)")
        return {"ray_address": self.ray_address, "actor_name": self.actor_name, "namespace": self.namespace}

    def __setstate__(self, state):
        self.__init__(None, **state)

    def _call(self, method: str, *args):
        if self._core is not None:
            return getattr(self._core, method)(*args)
        if self._actor is None:
            import ray

            if not ray.is_initialized():
                from data.ray_head import connect

                connect(self.ray_address, self.namespace)
            self._actor = ray.get_actor(self.actor_name, namespace=self.namespace)
        import ray

        # A call that times out on a live actor (busy: a deal, a state() of a large plan) is sent again when sending
        # it twice changes nothing: giving up would mark the coordinator lost, stop this rank's (or node's)
        # acknowledgements while its loaders go on reading, and let their leases expire into a second deal.
        attempts = self.call_attempts if method in IDEMPOTENT_CALLS else 1
        for attempt in range(attempts):
            try:
                return ray.get(getattr(self._actor, method).remote(*args), timeout=self.call_timeout_s)
            except ray.exceptions.GetTimeoutError as error:
                if attempt + 1 < attempts:
                    continue
                raise CoordinatorUnavailable(self._unreachable(error, attempts)) from error
            except ray.exceptions.RayError as error:  # the actor, or its whole cluster, is gone
                raise CoordinatorUnavailable(self._unreachable(error, 1)) from error

    def _unreachable(self, error, attempts: int) -> str:
        tried = f" ({attempts} attempts of {self.call_timeout_s:g} s)" if attempts > 1 else ""
        return (f"data coordinator {self.actor_name!r} unreachable{tried}: "
                f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")

    def request(self, consumer: str, slot: int = 0, slots: int = 1) -> Dict[str, Any]:
        return self._call("request", consumer, slot, slots)

    def ack(self, tags: List[Sequence[int]], consumer: Optional[str] = None) -> None:
        if tags:
            self._call("ack", [list(t) for t in tags], consumer)

    def ack_step(self, by_consumer: Dict[str, List[Sequence[int]]]) -> None:
        self._call("ack_step", {consumer: [list(t) for t in tags] for consumer, tags in by_consumer.items()})

    def release(self, consumer: str, dead: bool = True) -> int:
        return self._call("release", consumer, dead)

    def state(self) -> Dict[str, Any]:
        return self._call("state")

    def restore(self, state: Dict[str, Any], slots: Optional[int] = None) -> None:
        self._call("restore", state, slots)

    def summary(self) -> Dict[str, Any]:
        return self._call("summary")


def start_ray_coordinator(shards: Sequence[Tuple[str, int]], seed: int, chunk_samples: Optional[int],
                          actor_name: str, namespace: str, address: Optional[str] = None,
                          object_store_bytes: int = 80 * 2 ** 20, lease_timeout_s: float = 600.0,
                          work_stealing: bool = False) -> CoordinatorClient:
    """On the main rank: attach to a cluster at `address` (or start a local one) and create the actor."""
    import os

    import ray

    from data.ray_head import connect, start_private_head

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        if not address:
            # A private head in a session of its own, never a cluster some earlier `ray start` left behind, and
            # not in this rank's process group: a stop signal to the group must not take the data plan down
            # before the final checkpoint (data/ray_head.py).
            _, address = start_private_head(object_store_bytes)
        connect(address, namespace)
    try:
        # One this name left by an earlier main rank of the run (a restart on a cluster whose Ray outlived it, or a
        # run that just ended on a shared cluster): its plan is stale, and a resume restores the checkpoint's.
        ray.kill(ray.get_actor(actor_name, namespace=namespace))
    except ValueError:
        pass
    actor_class = ray.remote(num_cpus=0)(CoordinatorCore)
    handle = _create_actor(actor_class, actor_name, namespace, list(shards), seed, chunk_samples, lease_timeout_s,
                           work_stealing=work_stealing)
    gcs_address = ray.get_runtime_context().gcs_address
    client = CoordinatorClient(None, gcs_address, actor_name, namespace)
    # This handle keeps the actor alive exactly as long as the main rank: a named actor that is not
    # detached dies with its last handle, and the copies other ranks receive carry only its name.
    client._actor = handle
    client.summary()  # wait until the actor answers
    return client


def _create_actor(actor_class, name: str, namespace: str, *args, attempts: int = 50, **kwargs):
    """The named actor, once Ray has released the name of one just killed (it does so asynchronously)."""
    import time

    for attempt in range(attempts):
        try:
            return actor_class.options(name=name, namespace=namespace).remote(*args, **kwargs)
        except ValueError:  # the name is still taken
            if attempt == attempts - 1:
                raise
            time.sleep(0.1)


def connect_coordinator(cfg, rows: Sequence[Tuple[str, int]], run_dir, rank: int, world_size: int) -> CoordinatorClient:
    """Collective. In-process for a single process without workers; otherwise a Ray actor started (or attached
    to a cluster at data.ray_address) by rank 0 and found by name from every rank and worker. `cfg`: the
    `data` config section."""
    import hashlib
    import logging
    from pathlib import Path

    import torch.distributed as dist

    mode = cfg.coordinator
    if mode == "auto":
        mode = "ray" if world_size > 1 or cfg.num_workers > 0 or cfg.ray_address else "local"
    if mode == "local":
        return CoordinatorClient(CoordinatorCore(rows, cfg.seed, cfg.chunk_samples, cfg.lease_timeout_s,
                                                 work_stealing=cfg.work_stealing))
    # One actor per run directory, so two runs on one Ray cluster never share a data plan.
    namespace = "kino-" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    name = "data-coordinator"
    client = [start_ray_coordinator(rows, cfg.seed, cfg.chunk_samples, name, namespace, cfg.ray_address,
                                    lease_timeout_s=cfg.lease_timeout_s, work_stealing=cfg.work_stealing)
              if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(client, src=0)  # carries the cluster address, not the actor
    if rank == 0:
        logging.getLogger("kino").info("data coordinator: Ray actor %r in namespace %s at %s", name, namespace,
                                       client[0].ray_address)
    return client[0]

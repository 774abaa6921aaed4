"""Epochs in lockstep across ranks (data.strict_epochs): no rank trains a sample of epoch e+1 while a sample of epoch e
waits anywhere, so every sample's training count stays within one of every other's at every step.

Each loader consumer (rank x worker) yields its batches in epoch order: the packer never mixes epochs
(data/loader.py). The gate keeps each consumer's batches in a queue of its own. At the start of an optimizer step
the ranks agree, in one small all-reduce, on the oldest epoch any of them still has to train: the floor. Within the
step a rank hands out the oldest of its consumers' head batches while that one's epoch is at most the floor; past
it, the rank runs its head batch with a zero loss weight (every rank must take part in every micro-batch's gradient
collectives) and keeps it for a later step. The decisions depend only on the batches' epochs and the order they were
read in, never on timing, so a run and its resume decide alike.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Deque, Dict, Iterable, Optional, Tuple

from data.batch import PackedBatch

# What a rank with no batch of its own contributes to the floor (a sequence-parallel member: its leader decides).
NO_EPOCH = 2 ** 62


class EpochGate:
    def __init__(self, consumers: Iterable[str]):
        self.consumers = list(consumers)
        self.queues: Dict[str, Deque[Tuple[int, PackedBatch]]] = {c: deque() for c in self.consumers}
        self.floor: Optional[int] = None  # this step's: None trains whatever comes
        self._read = 0  # batches put so far: ties between consumers go to the batch read first

    def wanting(self) -> bool:
        """Whether a consumer has no batch waiting (its next one could be older than every head here)."""
        return any(not queue for queue in self.queues.values())

    def put(self, batch: PackedBatch) -> None:
        self.queues.setdefault(batch.consumer, deque()).append((self._read, batch))
        self._read += 1

    def oldest_epoch(self) -> int:
        head = self._oldest_head()
        return NO_EPOCH if head is None else head[1].epoch

    def take(self) -> PackedBatch:
        """The micro-batch to run now: the oldest head, handed over when its epoch is at most the floor, else a
        copy of it marked `trains=False` that stays queued."""
        head = self._oldest_head()
        if head is None:
            raise StopIteration("no batch left to hand out")
        queue, batch = head[0], head[1]
        if self.floor is not None and batch.epoch > self.floor:
            return dataclasses.replace(batch, trains=False)
        self.queues[queue].popleft()
        return batch

    def clear(self) -> None:
        """A new stage's loader re-reads what was queued (the snapshots stand at the last trained batches)."""
        for queue in self.queues.values():
            queue.clear()
        self.floor = None

    def _oldest_head(self):
        heads = [(batch.epoch, read, consumer, batch) for consumer, queue in self.queues.items() if queue
                 for read, batch in [queue[0]]]
        if not heads:
            return None
        _, _, consumer, batch = min(heads, key=lambda h: (h[0], h[1]))
        return consumer, batch


def loss_weighted(loss, batch: PackedBatch):
    """The loss to backpropagate: a batch held for a later step (`trains=False`) adds nothing to the gradient,
    yet its backward pass takes part in every gradient collective of the micro-batch, as the other ranks' do.
    Averaged over all data-parallel ranks, as torch's uneven-input Join does by default: a step with held batches
    is a smaller batch, not a rescaled one."""
    return loss if batch.trains else loss * 0.0

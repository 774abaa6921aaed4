"""Acknowledgements keep each loader worker's leases alive: a rank with several decode workers (data.num_workers)
acknowledges every batch in the name of the worker that read it, so no live worker's chunk is ever dealt again.

The real coordinator and the trainer's real settle step; only the clock is the test's, so leases expire without
waiting."""
from types import SimpleNamespace

import torch

from data.batch import ConsumerSnapshot, PackedBatch, PreparedClip
from data.coordinator import CoordinatorClient, CoordinatorCore
from data.licenses import Audit
from train.trainer import Trainer
from train.sequence_parallel import SequenceLayout


def batch_read_by(consumer, lease, offset):
    """A one-clip batch: sample `offset` of the chunk `lease` handed to `consumer`."""
    clip = PreparedClip(video=torch.zeros(1, 4, 4, 3, dtype=torch.uint8), caption="", key=f"{consumer}-{offset}",
                        shard=lease["shard"], meta={}, tokens=1,
                        tag=(lease["epoch"], lease["chunk"], lease["start"] + offset))
    return PackedBatch([clip], [], consumer, ConsumerSnapshot(stage=[]))


def test_no_chunk_of_a_live_worker_is_dealt_again_after_the_lease_timeout():
    clock = [0.0]
    core = CoordinatorCore([("shard-0.tar", 8), ("shard-1.tar", 8), ("shard-2.tar", 8), ("shard-3.tar", 8)],
                           seed=0, chunk_samples=4, lease_timeout_s=10.0, clock=lambda: clock[0])
    coordinator = CoordinatorClient(core)
    # One rank, two decode workers (slots 0 and 1 of 2), each holding a chunk it has partly trained.
    first = {w: coordinator.request(f"rank0-worker{w}", w, 2) for w in (0, 1)}
    trainer = SimpleNamespace(env=SimpleNamespace(rank=0), loader_snapshots={}, audit=Audit(), coordinator=coordinator,
                              step=0, layout=SequenceLayout(1, 0, 1))
    for n, now in enumerate((6.0, 12.0, 18.0)):  # each worker trains a batch every 6 s: inside the 10 s lease
        clock[0] = now
        Trainer._settle(trainer, [batch_read_by(f"rank0-worker{w}", first[w], n) for w in (0, 1)], trained=False)
    clock[0] = 21.0  # 21 s after worker 1 took its chunk (3 of its 4 samples trained), 3 s after its last batch
    dealt = [coordinator.request("rank0-worker0", 0, 2) for _ in range(3)]
    held_by_worker1 = (first[1]["epoch"], first[1]["chunk"])
    assert held_by_worker1 not in [(d["epoch"], d["chunk"]) for d in dealt], "a live worker's chunk was dealt again"
    assert [key for key, (holder, _, _) in core.leases.items() if holder == "rank0-worker1"] == [held_by_worker1]


def test_a_worker_that_stops_acknowledging_loses_its_chunk_after_the_lease():
    clock = [0.0]
    core = CoordinatorCore([("shard-0.tar", 8), ("shard-1.tar", 8)], seed=0, chunk_samples=4, lease_timeout_s=10.0,
                           clock=lambda: clock[0])
    coordinator = CoordinatorClient(core)
    dead = coordinator.request("rank0-worker1", 1, 2)
    clock[0] = 11.0
    dealt = coordinator.request("rank0-worker0", 0, 2)
    assert (dealt["epoch"], dealt["chunk"]) == (dead["epoch"], dead["chunk"])  # the orphan goes first

"""Acknowledgements keep each loader worker's leases alive: a rank with several decode workers (data.num_workers)
acknowledges every batch in the name of the worker that read it, so no live worker's chunk is ever dealt again.

The real coordinator and the trainer's real settle step; only the clock is the test's, so leases expire without
waiting."""
from types import SimpleNamespace

import torch

from data.batch import ConsumerSnapshot, PackedBatch, PreparedClip
from data.coordinator import CoordinatorClient, CoordinatorCore
from data.licenses import Audit
from train.provenance import ProvenanceLog
from train.trainer import Trainer
from train.sequence_parallel import SequenceLayout


def batch_read_by(consumer, lease, offset):
    """A one-clip batch: sample `offset` of the chunk `lease` handed to `consumer`."""
    clip = PreparedClip(video=torch.zeros(1, 4, 4, 3, dtype=torch.uint8), caption="", key=f"{consumer}-{offset}",
                        shard=lease["shard"], meta={}, tokens=1,
                        tag=(lease["epoch"], lease["chunk"], lease["start"] + offset))
    return PackedBatch([clip], [], consumer, ConsumerSnapshot(stage=[]))


def test_no_chunk_of_a_live_worker_is_dealt_again_after_the_lease_timeout(tmp_path):
    clock = [0.0]
    core = CoordinatorCore([("shard-0.tar", 8), ("shard-1.tar", 8), ("shard-2.tar", 8), ("shard-3.tar", 8)],
                           seed=0, chunk_samples=4, lease_timeout_s=10.0, clock=lambda: clock[0])
    coordinator = CoordinatorClient(core)
    # One rank, two decode workers (slots 0 and 1 of 2), each holding a chunk it has partly trained.
    first = {w: coordinator.request(f"rank0-worker{w}", w, 2) for w in (0, 1)}
    trainer = SimpleNamespace(env=SimpleNamespace(rank=0), loader_snapshots={}, audit=Audit(), coordinator=coordinator,
                              step=0, layout=SequenceLayout(1, 0, 1), _acked_since=[], _coordinator_lost=False,
                              provenance=ProvenanceLog(tmp_path, 0, enabled=True))
    for n, now in enumerate((6.0, 12.0, 18.0)):  # each worker trains a batch every 6 s: inside the 10 s lease
        clock[0] = now
        Trainer._settle(trainer, [batch_read_by(f"rank0-worker{w}", first[w], n) for w in (0, 1)], trained=False)
    clock[0] = 21.0  # 21 s after worker 1 took its chunk (3 of its 4 samples trained), 3 s after its last batch
    dealt = [coordinator.request("rank0-worker0", 0, 2) for _ in range(3)]
    held_by_worker1 = (first[1]["epoch"], first[1]["chunk"])
    assert held_by_worker1 not in [(d["epoch"], d["chunk"]) for d in dealt], "a live worker's chunk was dealt again"
    # The skipped steps' samples are in provenance as dropped (non-finite step), each once.
    from tests.exactly_once import provenance_records

    dropped = [tuple(d[:3]) for r in provenance_records(tmp_path) for d in r["dropped"] if d[3] == "nonfinite_step"]
    assert len(dropped) == 6 and len(set(dropped)) == 6
    assert [key for key, (holder, _) in core.leases.items() if holder == "rank0-worker1"] == [held_by_worker1]


def test_a_worker_that_stops_acknowledging_loses_its_chunk_after_the_lease():
    clock = [0.0]
    core = CoordinatorCore([("shard-0.tar", 8), ("shard-1.tar", 8)], seed=0, chunk_samples=4, lease_timeout_s=10.0,
                           clock=lambda: clock[0])
    coordinator = CoordinatorClient(core)
    dead = coordinator.request("rank0-worker1", 1, 2)
    clock[0] = 11.0
    dealt = coordinator.request("rank0-worker0", 0, 2)
    assert (dealt["epoch"], dealt["chunk"]) == (dead["epoch"], dead["chunk"])  # the orphan goes first


def test_the_trainer_rebuilds_the_acknowledged_plan_without_the_coordinator():
    """mirrored_state: the plan at a checkpoint plus the acknowledgements since equals the coordinator's record of
    them (a new epoch begun since included), and a resume from it deals the rest out so no sample repeats."""
    from data.coordinator import mirrored_state

    rows = [("shard-0.tar", 6), ("shard-1.tar", 6)]
    live = CoordinatorCore(rows, seed=3, chunk_samples=3)
    acked = []

    def train(n):
        for _ in range(n):
            work = live.request("rank0-worker0", 0, 1)
            tags = [[work["epoch"], work["chunk"], o] for o in range(work["start"], work["stop"])
                    if o not in work["skip"]][:2]  # part of each chunk: leases stay open
            live.ack(tags)
            acked.extend(tags)

    train(3)
    base = live.state()
    before = list(acked)
    acked.clear()
    train(6)  # crosses into epoch 1
    rebuilt = mirrored_state(rows, 3, 3, base, acked)
    assert rebuilt["mirrored"] and rebuilt["completed_epochs"] == live.state()["completed_epochs"]
    for epoch, saved in live.state()["epochs"].items():
        assert (rebuilt["epochs"][epoch]["finished"], rebuilt["epochs"][epoch]["partial"]) == \
            (saved["finished"], saved["partial"])
    resumed = CoordinatorCore(rows, seed=3, chunk_samples=3)
    resumed.restore(rebuilt, None)
    open_epochs = set(rebuilt["epochs"])
    trained = {(str(e), str(c), o) for e, c, o in before + acked if str(e) in open_epochs}
    while resumed.completed_epochs == rebuilt["completed_epochs"]:  # the rest of the open epoch, once each
        work = resumed.request("rank0-worker0", 0, 1)
        tags = [(str(work["epoch"]), str(work["chunk"]), o) for o in range(work["start"], work["stop"])
                if o not in work["skip"]]
        assert not trained & {(e, c, o) for e, c, o in tags}
        trained |= set(tags)
        resumed.ack([[int(e), int(c), o] for e, c, o in tags])

"""The coordinator's leases and its mirror: a consumer that stops acknowledging loses its chunk after the lease
(the test's clock stands in for time), and the plan rebuilt without the coordinator equals its own record. The
data plane's side of acknowledgements (each batch in the name of the worker that read it) is in
test_data_plane.py."""
from data.coordinator import CoordinatorClient, CoordinatorCore


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

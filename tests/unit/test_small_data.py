"""A dataset with fewer chunks than consumers (22 clips make one shard, one chunk) on several ranks and workers:
every consumer gets work, and every epoch is trained exactly once. It once recursed until Python gave up."""
from collections import Counter

from data.coordinator import CoordinatorCore, _Epoch


def test_a_consumer_with_no_share_of_the_first_epoch_starts_the_next_instead_of_recursing():
    core = CoordinatorCore([("a.tar", 22)], 0, None)  # the reproduction: one shard, one chunk
    lease = core.request("r1", 1, 2)
    assert (lease["epoch"], lease["chunk"], lease["start"], lease["stop"]) == (1, 0, 0, 22)
    assert sorted(core.epochs) == [0, 1]  # not 994 epochs
    assert core.request("r0", 0, 2)["epoch"] == 0
    stealing = CoordinatorCore([("a.tar", 22)], 0, None, work_stealing=True)
    lease = stealing.request("r1", 1, 2)  # slot 1 has no share of epoch 0: it takes slot 0's
    assert (lease["epoch"], lease["chunk"]) == (0, 0)
    assert stealing.request("r0", 0, 2)["epoch"] == 1 and sorted(stealing.epochs) == [0, 1]


def test_one_chunk_on_two_ranks_with_two_workers_each_trains_every_epoch_exactly_once():
    core = CoordinatorCore([("a.tar", 22)], 0, None)
    consumers = [(f"rank{r}-worker{w}", r * 2 + w) for r in (0, 1) for w in (0, 1)]  # 4 slots
    trained = Counter()
    for _ in range(5):  # each consumer reads a whole chunk, acknowledges it, asks again
        for name, slot in consumers:
            lease = core.request(name, slot, len(consumers))
            tags = [(lease["epoch"], lease["chunk"], offset) for offset in range(lease["start"], lease["stop"])
                    if offset not in lease["skip"]]
            trained.update(tags)
            core.ack(tags, name)
    assert set(trained.values()) == {1}  # no sample twice in any epoch
    epochs = Counter(epoch for epoch, _, _ in trained)
    assert len(epochs) == 20 and set(epochs.values()) == {22}  # 20 chunk reads: 20 whole epochs, none split
    assert core.completed_epochs == 20 and len(core.epochs) <= 4


def test_the_deal_still_starts_at_slot_zero_when_chunks_divide_among_the_slots():
    """The rotating deal changes nothing for a dataset whose chunks divide evenly: the same world reads the same
    data in every epoch as before."""
    core = CoordinatorCore([(f"s{i}.tar", 4) for i in range(6)], 0, None)
    for epoch_id in range(3):
        epoch = _Epoch(epoch_id, core.chunks, 0)
        epoch.deal(2, set())
        assert [epoch.share(s) for s in (0, 1)] == [epoch.order[0::2].tolist(), epoch.order[1::2].tolist()]
    odd = CoordinatorCore([(f"s{i}.tar", 4) for i in range(3)], 0, None)
    first, second = _Epoch(0, odd.chunks, 0), _Epoch(1, odd.chunks, 0)
    first.deal(2, set())
    second.deal(2, set())
    assert [len(first.share(s)) for s in (0, 1)] == [2, 1]
    assert [len(second.share(s)) for s in (0, 1)] == [1, 2]  # the slot dealt one fewer goes first next epoch

"""Exactly once under chaos: the real coordinator core driven through random requests, partial reads and
acknowledgements, deaths, lease expiries, resizes and checkpoint round trips (a new core restored from state(),
as a resume on another world does). Live consumers are heard from at every step, as a rank's acknowledgements
keep its workers' leases; a silent one loses its leases when they expire. After every run, each finished epoch acknowledged every sample exactly
once, and no open epoch acknowledged one twice."""
import json
import random
from collections import Counter

import pytest

from data.coordinator import CoordinatorCore

OPERATIONS = 10_000


class Consumer:
    def __init__(self, name, slot):
        self.name, self.slot, self.reading = name, slot, []  # leases being read: [lease, next offset]


def run_chaos(seed: int, operations: int = OPERATIONS, work_stealing: bool = False):
    rng = random.Random(seed)
    shards = [(f"s{i}.tar", rng.randint(1, 30)) for i in range(rng.randint(1, 8))]
    chunk_samples = rng.choice([None, 1, 2, 3, 7])
    clock = [0.0]
    core = CoordinatorCore(shards, seed=seed, chunk_samples=chunk_samples, lease_timeout_s=50.0,
                           clock=lambda: clock[0], work_stealing=work_stealing)
    slots = rng.randint(1, 6)
    consumers = [Consumer(f"c{n}", n) for n in range(slots)]
    acked = Counter()
    born = slots

    def acknowledge(tags, consumer):
        core.ack(tags, consumer.name)
        acked.update(tags)

    for _ in range(operations):
        clock[0] += 1.0
        op = rng.random()
        consumer = rng.choice(consumers)
        if op < 0.35 or not consumer.reading:  # read on: a new chunk when none is in hand
            if len(consumer.reading) < 2:
                lease = core.request(consumer.name, consumer.slot, slots)
                todo = [o for o in range(lease["start"], lease["stop"]) if o not in set(lease["skip"])]
                consumer.reading.append([lease, todo])
        elif op < 0.85:  # train a few samples of a chunk in hand and acknowledge them
            lease, todo = consumer.reading[0]
            count = rng.randint(1, 4)
            tags = [(lease["epoch"], lease["chunk"], o) for o in todo[:count]]
            del todo[:count]
            if not todo:
                consumer.reading.pop(0)
            acknowledge(tags, consumer)
        elif op < 0.90:  # a consumer dies: what it read and did not acknowledge is lost with it
            core.release(consumer.name, dead=True)
            consumers.remove(consumer)
            born += 1
            consumers.append(Consumer(f"c{born}", consumer.slot))
        elif op < 0.93:  # a consumer goes silent: its leases expire 50 s on (it is replaced now)
            consumers.remove(consumer)
            born += 1
            consumers.append(Consumer(f"c{born}", consumer.slot))
        else:  # a checkpoint, and a resume on a new world (what was in flight is replayed)
            state = json.loads(json.dumps(core.state()))
            slots = rng.randint(1, 6)
            core = CoordinatorCore(shards, seed=seed, chunk_samples=chunk_samples, lease_timeout_s=50.0,
                                   clock=lambda: clock[0], work_stealing=work_stealing)
            core.restore(state, slots if rng.random() < 0.5 else None)
            born += slots
            consumers = [Consumer(f"c{born}-{n}", n) for n in range(slots)]
        for live in consumers:  # a live consumer is heard from every step (its rank acknowledges for it)
            if live.reading:
                core.ack([], live.name)
    return core, shards, chunk_samples, acked


@pytest.mark.parametrize("seed, work_stealing", [(s, s % 2 == 1) for s in range(6)])
def test_every_sample_is_acknowledged_once_per_epoch_under_chaos(seed, work_stealing):
    core, shards, chunk_samples, acked = run_chaos(seed, work_stealing=work_stealing)
    from data.coordinator import make_chunks

    samples = {(c.id, o) for c in make_chunks(shards, chunk_samples) for o in range(c.start, c.stop)}
    twice = [tag for tag, n in acked.items() if n > 1]
    assert not twice, f"acknowledged more than once: {twice[:5]}"
    finished = {epoch for epoch, _, _ in acked if epoch < min(core.epochs)}
    assert core.completed_epochs >= 3, "the run should finish several epochs"
    for epoch in finished:
        assert {(c, o) for e, c, o in acked if e == epoch} == samples, f"epoch {epoch} is missing samples"


def test_a_checkpoint_of_the_first_state_format_resumes_where_it_stood():
    """Checkpoints written before the compact state listed every acknowledged offset and each slot's queue: a
    resume on the same slots continues each queue in order, on other slots re-deals, and no sample repeats."""
    rows = [("a.tar", 4), ("b.tar", 4), ("c.tar", 4)]  # chunks of 2: ids 0-5
    old = {"seed": 0, "chunk_samples": 2, "completed_epochs": 0,
           "chunks": [["a.tar", 0, 2], ["a.tar", 2, 4], ["b.tar", 0, 2], ["b.tar", 2, 4], ["c.tar", 0, 2],
                      ["c.tar", 2, 4]],
           "epochs": {"0": {"done": {"3": [2, 3], "5": [2]}, "slots": 2, "undealt": [], "orphans": [],
                            "queues": {"0": [1, 4], "1": [0]}}}}
    same = CoordinatorCore(rows, seed=0, chunk_samples=2)
    same.restore(json.loads(json.dumps(old)), 2)
    assert [same.request("w0", 0, 2)["chunk"], same.request("w0", 0, 2)["chunk"]] == [1, 4]
    assert same.request("w1", 1, 2)["chunk"] == 0
    other = CoordinatorCore(rows, seed=0, chunk_samples=2)
    other.restore(json.loads(json.dumps(old)), 3)
    trained = Counter()
    while other.completed_epochs == 0:
        for slot in range(3):
            lease = other.request(f"n{slot}", slot, 3)
            tags = [(lease["epoch"], lease["chunk"], o) for o in range(lease["start"], lease["stop"])
                    if o not in lease["skip"]]
            other.ack(tags, f"n{slot}")
            trained.update(t for t in tags if t[0] == 0)
    assert trained[(0, 5, 2)] == 0 and trained[(0, 5, 3)] == 1 and (0, 3, 2) not in trained  # the saved acks hold
    assert set(trained.values()) == {1} and len(trained) == 12 - 3


def test_a_fast_consumer_helps_the_slow_one_so_every_sample_is_trained_within_one_count_of_the_others():
    """Two ranks that read at different speeds (one packs 3 samples a step, the other 1: clips of different
    sizes): with data.work_stealing a rank done with its share takes the other's last chunks before opening a new
    epoch. Without it they ran 4 epochs apart over 120 steps."""
    core = CoordinatorCore([(f"s{i}.tar", 2) for i in range(12)], seed=0, chunk_samples=2,  # 24 clips, 12 chunks
                           work_stealing=True)
    speeds = {"fast": 3, "slow": 1}
    reading = {name: [] for name in speeds}
    trained = Counter()
    for _ in range(120):
        for slot, (name, speed) in enumerate(speeds.items()):
            tags = []
            while len(tags) < speed:
                if not reading[name]:
                    lease = core.request(name, slot, 2)
                    reading[name] = [(lease["epoch"], lease["chunk"], o) for o in range(lease["start"], lease["stop"])
                                     if o not in lease["skip"]]
                tags.append(reading[name].pop(0))
            core.ack(tags, name)
            trained.update((chunk, offset) for _, chunk, offset in tags)
        assert max(trained.values()) - min(trained.get((c, o), 0) for c in range(12) for o in (0, 1)) <= 2
    counts = [trained[(c, o)] for c in range(12) for o in (0, 1)]
    assert max(counts) - min(counts) <= 1, counts
    assert len(core.epochs) <= 2

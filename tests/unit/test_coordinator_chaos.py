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


def run_chaos(seed: int, operations: int = OPERATIONS):
    rng = random.Random(seed)
    shards = [(f"s{i}.tar", rng.randint(1, 30)) for i in range(rng.randint(1, 8))]
    chunk_samples = rng.choice([None, 1, 2, 3, 7])
    clock = [0.0]
    core = CoordinatorCore(shards, seed=seed, chunk_samples=chunk_samples, lease_timeout_s=50.0,
                           clock=lambda: clock[0])
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
                                   clock=lambda: clock[0])
            core.restore(state, slots if rng.random() < 0.5 else None)
            born += slots
            consumers = [Consumer(f"c{born}-{n}", n) for n in range(slots)]
        for live in consumers:  # a live consumer is heard from every step (its rank acknowledges for it)
            if live.reading:
                core.ack([], live.name)
    return core, shards, chunk_samples, acked


@pytest.mark.parametrize("seed", range(6))
def test_every_sample_is_acknowledged_once_per_epoch_under_chaos(seed):
    core, shards, chunk_samples, acked = run_chaos(seed)
    from data.coordinator import make_chunks

    samples = {(c.id, o) for c in make_chunks(shards, chunk_samples) for o in range(c.start, c.stop)}
    twice = [tag for tag, n in acked.items() if n > 1]
    assert not twice, f"acknowledged more than once: {twice[:5]}"
    finished = {epoch for epoch, _, _ in acked if epoch < min(core.epochs)}
    assert core.completed_epochs >= 3, "the run should finish several epochs"
    for epoch in finished:
        assert {(c, o) for e, c, o in acked if e == epoch} == samples, f"epoch {epoch} is missing samples"

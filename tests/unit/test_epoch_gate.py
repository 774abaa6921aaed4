"""data.strict_epochs: the epoch gate (train/epoch_gate.py) keeps every clip's training count within one of every
other's, however unevenly ranks get through their shares, and the packer never mixes epochs in one batch.

The gate's decisions are simulated over stand-in ranks (the all-reduce of the floor is a min over them, as
DataPlane.begin_step's is); the packing is the real DataPlane over the real tiny dataset."""
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from data.batch import PackedBatch
from tests.unit.test_data_plane import plane_for
from train.epoch_gate import EpochGate, loss_weighted


def uneven_ranks(seed: int, ranks: int = 4, workers: int = 2, clips: int = 48, epochs: int = 30):
    """Each rank's consumers read an epoch's share in batches of 1 to 6 clips (rank r's run larger: uneven
    packing), epoch after epoch, as the loader yields them. Returns (per rank the consumers' batches, clips)."""
    rng = random.Random(seed)
    consumers = {(r, w): [] for r in range(ranks) for w in range(workers)}
    for epoch in range(epochs):
        order = list(range(clips))
        rng.shuffle(order)
        for index, clip in enumerate(order):  # the deal: clip i of the epoch to consumer i mod consumers
            consumers[list(consumers)[index % len(consumers)]].append((epoch, clip))
    streams = {}
    for (r, w), samples in consumers.items():
        batches, i = [], 0
        while i < len(samples):
            size = rng.randint(1, 3 + 3 * (r == 0))
            epoch = samples[i][0]
            taken = [s for s in samples[i:i + size] if s[0] == epoch]  # the packer closes an epoch's last batch
            batches.append(PackedBatch([SimpleNamespace(tag=(e, c, 0)) for e, c in taken], [], f"rank{r}-worker{w}",
                                       None))
            i += len(taken)
        streams[(r, w)] = iter(batches)
    return streams, ranks, workers, clips


def simulate(seed: int, gated: bool, steps: int = 60):
    """Steps of the ranks; returns the widest spread of training counts after any step, and every consumer's
    trained batches in order."""
    streams, ranks, workers, clips = uneven_ranks(seed)
    gates = [EpochGate(f"rank{r}-worker{w}" for w in range(workers)) for r in range(ranks)]
    fetch_order = [[(r, w) for w in range(workers)] for r in range(ranks)]
    turn = [0] * ranks
    trained, worst, held, order = Counter(), 0, 0, {}
    for _ in range(steps):
        for r, gate in enumerate(gates):  # each rank fills its gate from its loader (workers round-robin)
            while gate.wanting():
                consumer = fetch_order[r][turn[r] % workers]
                turn[r] += 1
                gate.put(next(streams[consumer]))
        floor = min(g.oldest_epoch() for g in gates)  # DataPlane.begin_step: the all-reduce (MIN)
        for gate in gates:
            gate.floor = floor if gated else None
            batch = gate.take()
            if batch.trains:
                trained.update(clip.tag[1] for clip in batch.clips)
                order.setdefault(batch.consumer, []).append(batch)
            else:
                held += 1
        counts = [trained[c] for c in range(clips)]
        worst = max(worst, max(counts) - min(counts))
    return worst, held, order, trained


@pytest.mark.parametrize("seed", range(5))
def test_the_gate_keeps_every_clips_training_count_within_one_of_every_other(seed):
    worst, held, _, trained = simulate(seed, gated=True)
    assert worst <= 1
    assert sum(trained.values()) > 3 * 48  # several epochs went through: the gate holds batches, it does not stall
    assert held > 0  # the uneven ranks did have to wait


@pytest.mark.parametrize("seed", range(5))
def test_without_the_gate_the_same_ranks_drift_apart(seed):
    """Golden: the simulation above catches drift when the gate is off."""
    worst, held, _, _ = simulate(seed, gated=False)
    assert worst >= 2 and held == 0


def test_each_consumers_batches_train_in_the_order_it_read_them():
    """A held batch is trained later, never skipped or overtaken by its own consumer's next batch: the loader's
    snapshot of its last trained batch then says exactly what is still to train (a resume replays it)."""
    _, _, order, _ = simulate(0, gated=True)
    for consumer, batches in order.items():
        tags = [clip.tag for batch in batches for clip in batch.clips]
        epochs = [tag[0] for tag in tags]
        assert epochs == sorted(epochs), consumer


def test_a_held_batch_adds_nothing_to_the_gradient():
    import torch

    weight = torch.ones(3, requires_grad=True)
    held = PackedBatch([], [], "rank0-worker0", None, trains=False)
    loss_weighted((weight * 2).sum(), held).backward()
    assert torch.equal(weight.grad, torch.zeros(3))
    weight.grad = None
    loss_weighted((weight * 2).sum(), PackedBatch([], [], "rank0-worker0", None)).backward()
    assert torch.equal(weight.grad, torch.full((3,), 2.0))


@pytest.mark.parametrize("strict", [True, False])
def test_a_packed_batch_holds_one_epoch_only_with_strict_epochs(tiny_dataset, tmp_path, strict):
    """The real loader over several epochs of the tiny dataset. Golden: without data.strict_epochs the packing
    window carries clips of one epoch into the next epoch's batches (a budget of 800 tokens packs the tiny set's
    16 clips of 256 and 288 tokens unevenly: an epoch does not end on a batch's end)."""
    plane = plane_for(tiny_dataset, tmp_path / "run", f"data.strict_epochs={str(strict).lower()}",
                      "curriculum.stages.0.token_budget=800")
    mixed = 0
    for step in range(16):
        plane.begin_step(step, "cpu")
        batch = plane.next_batch(step)
        assert batch.trains  # one rank: nothing to wait for
        mixed += len({tag[0] for tag in batch.tags}) > 1
        plane.settle(step + 1, [batch], trained=True)
    assert (mixed == 0) if strict else (mixed > 0)
    assert plane.coordinator.state()["completed_epochs"] >= 2

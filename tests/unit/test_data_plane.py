"""The data plane (train/data_plane.py) as the trainer uses it: one object asked for the next batch and told which
batches trained. A real DataPlane over a real ingested dataset (in-process coordinator, real decoding), saved and
restored through the real CheckpointManager; only a stand-in clock or stand-in batches where a test says so."""
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conf.schema import load_config
from data.batch import ConsumerSnapshot, Drop, PackedBatch, PreparedClip
from data.coordinator import CoordinatorClient, CoordinatorCore
from tests.conftest import GATED, GOOD_SAMPLES
from train.checkpoint import CheckpointManager, ResumeRefused
from train.curriculum import Curriculum
from train.data_plane import DataPlane, DatasetChanged, NothingToTrain
from train.sequence_parallel import SequenceLayout

STEPS = 24


def plane_for(dataset: Path, run_dir: Path, *overrides: str, resume_path=None) -> DataPlane:
    cfg = load_config(["experiment=demo", f"data.root={dataset}", f"train.run_dir={run_dir}", "data.num_workers=0",
                       "data.chunk_samples=2", "train.record_sample_keys=true",
                       f"curriculum.stages.0.steps={STEPS}", "curriculum.stages.1.steps=0", *overrides], check=False)
    checkpoints = CheckpointManager(run_dir / "checkpoints", 0, 2, 1)
    return DataPlane(cfg, 0, SequenceLayout(1, 0, 1), Curriculum(cfg.curriculum), run_dir, checkpoints,
                     resume_path, pin_memory=False)


def train(plane: DataPlane, start: int, stop: int) -> list:
    """Steps start..stop-1: one micro-batch each, settled as trained. The (epoch, chunk, offset) tags trained."""
    tags = []
    for step in range(start, stop):
        batch = plane.next_batch(step)
        plane.settle(step + 1, [batch], trained=True)
        tags += [tuple(t) for t in batch.tags]
    return tags


def save(plane: DataPlane, step: int) -> Path:
    return plane.checkpoints.save_if_due(step, plane.resumable_state(lambda: {"step": step}), last_step=True)


def restore(plane: DataPlane, path: Path) -> None:
    plane.checkpoints.load(path, plane.resumable_state(lambda: {}))
    plane.resume(plane.checkpoints.saved_step(path))


def test_an_epoch_trains_every_licensed_sample_once_and_reports_every_drop(tiny_dataset, tmp_path):
    plane = plane_for(tiny_dataset, tmp_path / "run")
    trained = Counter()
    step = 0
    while plane.coordinator.state()["completed_epochs"] < 1 and step < 100:
        trained.update(train(plane, step, step + 1))
        step += 1
    first = {tag: n for tag, n in trained.items() if tag[0] == 0}
    assert len(first) == GOOD_SAMPLES and set(first.values()) == {1}
    audit = plane.merged_audit().state_dict()
    assert sum(audit["dropped"].values()) >= len(GATED) + 1  # the gated clips and the corrupt video, with reasons
    assert {"license_missing", "license_not_allowed"} <= set(audit["dropped"])


def test_a_resume_on_the_same_layout_continues_bit_exact(demo_like_dataset, tmp_path):
    """Clips of every duration and aspect: the packer holds read clips back for later batches, and the resume
    re-creates them from the loader's snapshot, in order."""
    straight = plane_for(demo_like_dataset, tmp_path / "straight")
    expected = train(straight, 0, STEPS)
    first = plane_for(demo_like_dataset, tmp_path / "run")
    before = train(first, 0, 7)
    path = save(first, 7)
    first.close()
    second = plane_for(demo_like_dataset, tmp_path / "run", resume_path=path)
    restore(second, path)
    assert before + train(second, 7, STEPS) == expected
    assert second.merged_audit().state_dict() == straight.merged_audit().state_dict()  # the audit continues too


def test_a_resume_without_the_coordinator_rebuilds_the_plan_and_repeats_no_sample(tiny_dataset, tmp_path):
    """The coordinator gone before the checkpoint (a stop signal took Ray down): the plan is rebuilt from the
    data plane's own record; the resume deals the rest of the epoch anew, each sample still once."""
    first = plane_for(tiny_dataset, tmp_path / "run")
    before = train(first, 0, 5)
    save(first, 5)
    before += train(first, 5, 9)

    def gone():
        from data.coordinator import CoordinatorUnavailable
        raise CoordinatorUnavailable("the coordinator's Ray cluster stopped")

    first.coordinator.state = gone
    path = save(first, 9)
    second = plane_for(tiny_dataset, tmp_path / "run", resume_path=path)
    restore(second, path)
    after = train(second, 9, STEPS)
    counts = Counter(before + after)
    assert max(counts.values()) == 1  # (epoch, chunk, offset) tags: none trained twice
    assert len([t for t in counts if t[0] == 0]) == GOOD_SAMPLES


def test_a_changed_dataset_refuses_the_resume_unless_allowed(tiny_dataset, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(tiny_dataset, copy)
    first = plane_for(copy, tmp_path / "run")
    train(first, 0, 3)
    path = save(first, 3)
    from data.schema import read_manifest, write_manifest

    manifest = read_manifest(copy)
    manifest["shards"][0]["sha256"] = "0" * 64  # as a rebuild of that shard leaves it
    write_manifest(copy, manifest)
    with pytest.raises(DatasetChanged, match="data.allow_changed_dataset=true") as refused:
        restore(plane_for(copy, tmp_path / "run", resume_path=path), path)
    assert isinstance(refused.value, ResumeRefused)  # one line and exit 2 in train/main.py
    allowed = plane_for(copy, tmp_path / "run", "data.allow_changed_dataset=true", resume_path=path)
    restore(allowed, path)
    assert train(allowed, 3, 5)


# -- the dataset check's rules (stand-in fingerprints) --------------------------------------------------------
def check(saved, now, root="videos", plan="p1"):
    plane = SimpleNamespace(dataset_fingerprints=lambda: {"plan": plan, "sources": now}, resume_path="ckpt",
                            cfg=SimpleNamespace(data=SimpleNamespace(root=root, allow_changed_dataset=False)))
    DataPlane.check_dataset(plane, saved)


SAVED = {"plan": "p1", "sources": {"videos": "A"}}


def test_unchanged_sources_and_a_new_cache_resume():
    check(SAVED, {"videos": "A"})
    check(SAVED, {"videos": "A", "cache": "C"})  # stage 1 moved to a cache of the same shards
    check(SAVED, {"cache": "C"})  # every stage from a cache now
    check(SAVED, {"moved": "A"}, root="moved")  # the same videos under another path
    check("A", {"videos": "A", "cache": "C"})  # a checkpoint of a run that read one source


@pytest.mark.parametrize("now, root, plan", [
    ({"videos": "B"}, "videos", "p1"),  # taken down or rebuilt
    ({"other": "B"}, "other", "p1"),  # data.root pointed at another dataset of the same shard names and counts
    ({"cache": "C"}, "videos", "p2"),  # a cache holding other shards than the plan's
])
def test_changed_data_is_refused(now, root, plan):
    with pytest.raises(DatasetChanged, match="data.allow_changed_dataset=true"):
        check(SAVED, now, root=root, plan=plan)


def test_a_single_source_checkpoint_refuses_other_data():
    with pytest.raises(DatasetChanged):
        check("A", {"videos": "B"})


# -- stand-in batches: a stage that can train on nothing --------------------------------------------------------
def stand_in_plane(batches, samples: int):
    from train.config import CurriculumConfig, StageConfig

    plane = DataPlane.__new__(DataPlane)  # no dataset: the batches below stand in for the loader's
    plane.layout, plane.dataset_samples = SequenceLayout(1, 0, 1), samples
    plane.curriculum = Curriculum(CurriculumConfig(stages=[StageConfig(name="main")]))
    plane._iterator, plane._iterator_stage = iter(batches), 0
    plane.cfg = SimpleNamespace(data=SimpleNamespace(root="datasets/x"))
    plane._pending_drops, plane._drops_in_row, plane.gate = {}, [], None
    return plane


def drops(epoch: int, chunk: int, reason: str = "too_short"):
    return PackedBatch([], [Drop((epoch, chunk, offset), reason, f"k{chunk}-{offset}") for offset in range(4)],
                       "rank0-worker0", None)


def test_a_rank_meeting_the_same_bad_chunk_epoch_after_epoch_goes_on_to_the_good_sample():
    """It counts distinct samples, not drops: one rank reads a share of each epoch, so the same bad chunk can
    come back epoch after epoch while good ones go to other ranks."""
    clip = SimpleNamespace()
    good = PackedBatch([clip], [], "rank0-worker0", None)
    # 8 samples in 2 chunks; this rank meets chunk 0 (all bad) in three epochs, 12 drops in a row, then a clip.
    batch = stand_in_plane([drops(0, 0), drops(1, 0), drops(2, 0), good], 8).next_batch(0)
    assert batch.clips == [clip] and len(batch.dropped) == 12


def test_every_sample_dropped_stops_the_stage_with_the_reasons():
    plane = stand_in_plane([drops(0, 0), drops(0, 1), drops(1, 0)], 8)
    with pytest.raises(NothingToTrain, match=r"stage 'main' can train on nothing.*too_short=8"):
        plane.next_batch(0)


# -- acknowledgements keep each loader worker's leases alive (the test's clock) ---------------------------------
def batch_read_by(consumer, lease, offset):
    """A one-clip batch: sample `offset` of the chunk `lease` handed to `consumer`."""
    clip = PreparedClip(video=torch.zeros(1, 4, 4, 3, dtype=torch.uint8), caption="", key=f"{consumer}-{offset}",
                        shard=lease["shard"], meta={}, tokens=1,
                        tag=(lease["epoch"], lease["chunk"], lease["start"] + offset))
    return PackedBatch([clip], [], consumer, ConsumerSnapshot(stage=[]))


def test_no_chunk_of_a_live_worker_is_dealt_again_after_the_lease_timeout(tiny_dataset, tmp_path):
    """A rank with several decode workers acknowledges every batch in the name of the worker that read it, so no
    live worker's chunk is ever dealt again."""
    clock = [0.0]
    core = CoordinatorCore([("shard-0.tar", 8), ("shard-1.tar", 8), ("shard-2.tar", 8), ("shard-3.tar", 8)],
                           seed=0, chunk_samples=4, lease_timeout_s=10.0, clock=lambda: clock[0])
    plane = plane_for(tiny_dataset, tmp_path / "run")
    plane.coordinator = coordinator = CoordinatorClient(core)
    # One rank, two decode workers (slots 0 and 1 of 2), each holding a chunk it has partly trained.
    first = {w: coordinator.request(f"rank0-worker{w}", w, 2) for w in (0, 1)}
    for n, now in enumerate((6.0, 12.0, 18.0)):  # each worker trains a batch every 6 s: inside the 10 s lease
        clock[0] = now
        plane.settle(n + 1, [batch_read_by(f"rank0-worker{w}", first[w], n) for w in (0, 1)], trained=False)
    clock[0] = 21.0  # 21 s after worker 1 took its chunk (3 of its 4 samples trained), 3 s after its last batch
    dealt = [coordinator.request("rank0-worker0", 0, 2) for _ in range(3)]
    held_by_worker1 = (first[1]["epoch"], first[1]["chunk"])
    assert held_by_worker1 not in [(d["epoch"], d["chunk"]) for d in dealt], "a live worker's chunk was dealt again"
    # The skipped steps' samples are in provenance as dropped (non-finite step), each once.
    from tests.exactly_once import provenance_records

    dropped = [tuple(d[:3]) for r in provenance_records(tmp_path / "run") for d in r["dropped"]
               if d[3] == "nonfinite_step"]
    assert len(dropped) == 6 and len(set(dropped)) == 6
    assert [key for key, (holder, _) in core.leases.items() if holder == "rank0-worker1"] == [held_by_worker1]

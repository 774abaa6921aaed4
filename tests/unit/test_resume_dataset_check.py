"""On resume the trainer compares the data it reads with the checkpoint's: a source read then must be unchanged,
a video root under a new path (data.root may move) must be one read then, a cache new to the run passes on the
plan's shards, and a checkpoint written when runs read one source still resumes when that source is read."""
from types import SimpleNamespace

import pytest

from train.trainer import DatasetChanged, Trainer


def check(saved, now, root="videos", plan="p1"):
    trainer = SimpleNamespace(dataset_fingerprints=lambda: {"plan": plan, "sources": now}, _resume_path="ckpt",
                              cfg=SimpleNamespace(data=SimpleNamespace(root=root, allow_changed_dataset=False)))
    Trainer._check_dataset(trainer, saved)


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

"""The loader over real WebDataset shards: license gate, token budget, exact resume, bad input."""
import io
import json
import tarfile
from collections import Counter

import pytest

from data.licenses import LicensePolicy
from data.loader import ClipStream, LoaderSpec, dataset_shards
from data.buckets import bucket_shapes
from data.samples import render_clip
from data.shards import ShardSetWriter, verify_shards
from data.video_io import encode_mp4
from tests.conftest import GATED, GOOD_SAMPLES

POLICY = LicensePolicy.from_ids(["CC0-1.0", "CC-BY-3.0"])


def spec_for(root, rank=0, world_size=1, positions=None, budget=1600):
    return LoaderSpec(root=str(root), shards=dataset_shards(root), policy=POLICY,
                      shapes=bucket_shapes([32], [1.0, 1.78, 0.56], [4, 8], multiple=4), token_budget=budget,
                      patch_size=(1, 4, 4), temporal_factor=1, spatial_factor=1, fps=8.0, seed=0,
                      rank=rank, world_size=world_size, positions=positions or {})


def one_epoch(stream_iter):
    batches = []
    for batch in stream_iter:
        batches.append(batch)
        if batch["resume_position"][1] == 0:  # the stream moved on to the next epoch
            return batches
    raise AssertionError("stream ended")


def test_no_unlicensed_sample_reaches_a_batch_and_every_drop_is_counted(tiny_dataset):
    batches = one_epoch(iter(ClipStream(spec_for(tiny_dataset))))
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(f"procedural-{i:04d}" for i in range(GOOD_SAMPLES))
    assert not set(keys) & set(GATED)
    assert all(m["license"] in POLICY.allow for b in batches for m in b["meta"])
    dropped = Counter(reason for b in batches for reason, _ in b["dropped"])
    assert dropped == {"license_missing": 2, "license_not_allowed": 2, "undecodable": 1}
    named = {key: reason for b in batches for reason, key in b["dropped"]}
    assert {k: named[k] for k in GATED} == GATED and named["corrupt-00"] == "undecodable"


def test_every_micro_batch_stays_within_its_token_budget(tiny_dataset):
    batches = one_epoch(iter(ClipStream(spec_for(tiny_dataset, budget=1100))))
    assert all(0 < b["tokens"] <= 1100 for b in batches if b["videos"])
    for b in batches:
        assert b["tokens"] == sum(v.shape[0] * (v.shape[1] // 4) * (v.shape[2] // 4) for v in b["videos"])


def test_resuming_from_any_batch_trains_each_sample_exactly_once(tiny_dataset):
    for world_size in (1, 2):
        for stop_after in (1, 2, 3):
            trained = []
            for rank in range(world_size):
                stream = iter(ClipStream(spec_for(tiny_dataset, rank, world_size)))
                first = [next(stream) for _ in range(stop_after)]
                position = {first[-1]["stream"]: first[-1]["resume_position"]}
                if position[first[-1]["stream"]][1] == 0:
                    continue  # this rank's whole epoch fit in the first batches
                rest = one_epoch(iter(ClipStream(spec_for(tiny_dataset, rank, world_size, position))))
                trained += [k for b in first + rest for k in b["keys"]]
            if trained:
                assert sorted(trained) == sorted(f"procedural-{i:04d}" for i in range(GOOD_SAMPLES)), \
                    (world_size, stop_after)


def test_more_streams_than_shards_is_refused(tiny_dataset):
    with pytest.raises(ValueError, match="shards cannot feed"):
        ClipStream(spec_for(tiny_dataset, world_size=len(dataset_shards(tiny_dataset)) + 1))


def test_corrupt_inputs_are_skipped_counted_and_named(tmp_path):
    good = encode_mp4(render_clip("circle", "red", "black", "left", 64, 64, 12), 12)
    meta = {"license": "CC0-1.0", "source_url": "u", "attribution": "a", "rights_holder": "r",
            "width": 64, "height": 64, "fps": 12, "num_frames": 12}
    writer = ShardSetWriter(tmp_path, samples_per_shard=4)
    writer.write("ok-0", good, "a red circle", meta)
    writer.write("zero-bytes", b"", "nothing", meta)
    writer.write("bad-caption", good, "", meta, caption_bytes=b"\xff\xfe caption")
    writer.write("no-license", good, "x", {k: v for k, v in meta.items() if k != "license"})
    writer.write("ok-1", good, "a red circle", meta)
    for i in range(2, 6):
        writer.write(f"ok-{i}", good, "a red circle", meta)
    writer.close()
    assert verify_shards(tmp_path) == []
    # Truncate the second shard mid-way: the samples before the cut still count, the rest is one error.
    second = tmp_path / "shard-00001.tar"
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2])
    assert any("shard-00001.tar" in p for p in verify_shards(tmp_path))
    batches = one_epoch(iter(ClipStream(spec_for(tmp_path))))
    dropped = {key: reason for b in batches for reason, key in b["dropped"]}
    assert dropped["zero-bytes"] == "undecodable"
    assert dropped["bad-caption"] == "caption_not_utf8"
    assert dropped["no-license"] == "license_missing"
    assert dropped["shard-00001.tar"] == "corrupt_shard"
    keys = set(k for b in batches for k in b["keys"])
    assert {"ok-0", "ok-5"} <= keys  # shards 0 and 2 are intact
    assert keys <= {f"ok-{i}" for i in range(6)}
    assert len(keys & {"ok-1", "ok-2", "ok-3", "ok-4"}) < 4  # the cut shard lost its tail

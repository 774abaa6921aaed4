import random

import pytest

from data.buckets import BucketShape, GreedyPacker, assign_bucket, bucket_shapes


def test_shapes_keep_area_across_aspect_ratios_and_respect_the_multiple():
    shapes = bucket_shapes([32], [1.0, 1.78, 0.56], [4, 8], multiple=4)
    assert len(shapes) == 6
    for s in shapes:
        assert s.height % 4 == 0 and s.width % 4 == 0
        assert abs(s.height * s.width - 32 * 32) / (32 * 32) < 0.1
    assert {round(s.aspect_ratio, 1) for s in shapes} == {0.5, 1.0, 1.8}


def test_assignment_picks_longest_fitting_duration_then_nearest_aspect_ratio():
    shapes = bucket_shapes([32], [1.0, 1.78, 0.56], [4, 8], multiple=4)
    landscape = assign_bucket(shapes, width=128, height=72, available_frames=20)
    assert landscape.frames == 8 and landscape.width > landscape.height
    portrait_short = assign_bucket(shapes, width=72, height=128, available_frames=5)
    assert portrait_short.frames == 4 and portrait_short.height > portrait_short.width
    assert assign_bucket(shapes, width=96, height=96, available_frames=3) is None


def test_token_count_follows_patch_and_compression():
    shape = BucketShape(frames=9, height=64, width=32)
    assert shape.tokens((1, 4, 4)) == 9 * 16 * 8
    # causal VAE: 1 + (9 - 1) / 4 = 3 latent frames, 8x spatial, patch (1, 2, 2)
    assert shape.tokens((1, 2, 2), temporal_factor=4, spatial_factor=8) == 3 * 4 * 2


def test_packer_keeps_order_and_never_exceeds_the_budget():
    rng = random.Random(0)
    packer, batches, fed = GreedyPacker(100), [], []
    for i in range(500):
        tokens = rng.choice([10, 25, 40, 60, 100])
        fed.append(i)
        batches += packer.add((i, tokens), tokens)
    leftover = packer.flush()
    batches += [leftover] if leftover else []
    assert [item[0] for batch in batches for item in batch] == fed
    assert all(0 < sum(t for _, t in batch) <= 100 for batch in batches)


def test_packer_can_close_two_batches_with_one_item():
    packer = GreedyPacker(100)
    assert packer.add("a", 60) == []
    closed = packer.add("b", 100)  # does not fit after "a", and fills the next batch exactly
    assert closed == [["a"], ["b"]]


def test_packer_refuses_an_item_larger_than_the_budget():
    with pytest.raises(ValueError, match="exceeds the token budget"):
        GreedyPacker(10).add("big", 11)

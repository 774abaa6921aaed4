import random

import pytest

from data.buckets import BucketShape, WindowPacker, assign_bucket, bucket_shapes


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


def test_window_packer_never_exceeds_the_budget_and_fills_it_nearly():
    rng = random.Random(0)
    packer, batches, fed = WindowPacker(1600, window=16, tolerance=0.01), [], []
    for i in range(2000):
        tokens = rng.choice([200, 400, 800, 600])  # sizes that can fill 1600 exactly
        fed.append(i)
        batches += packer.add((i, tokens), tokens)
    leftover = packer.flush()
    assert sorted([item[0] for batch in batches for item in batch] + [entry[0] for entry in leftover]) == fed
    fills = [sum(t for _, t in batch) for batch in batches]
    assert all(0 < f <= 1600 for f in fills)
    assert 1 - sum(fills) / (1600 * len(fills)) <= 0.01  # unused budget
    assert len(packer.buffer) == 0


def test_a_full_window_emits_its_best_fill_rather_than_waiting_forever():
    packer = WindowPacker(1000, window=3, tolerance=0.0)
    assert packer.add("a", 400) == [] and packer.add("b", 400) == []
    assert packer.add("c", 400) == [["a", "b"]]  # 800 of 1000 is the best the window allows
    assert [entry[0] for entry in packer.buffer] == ["c"]


def test_packer_refuses_an_item_larger_than_the_budget():
    with pytest.raises(ValueError, match="exceeds the token budget"):
        WindowPacker(10).add("big", 11)

"""Real decord decoding of real mp4 bytes (encoded here with PyAV/libx264)."""
import random

import numpy as np
import pytest

from data.buckets import BucketShape
from data.decode import (ClipTooShort, UndecodableVideo, decode_clip, frames_available, resize_and_crop,
                         temporal_indices)
from data.demo_set import render_clip
from data.video_io import encode_mp4


@pytest.mark.parametrize("width, height", [(96, 96), (128, 72), (72, 128)])  # 72 px wide trips decord's bug
def test_decode_fits_a_clip_to_its_bucket_and_keeps_the_content(width, height):
    clip = render_clip("square", "red", "black", "right", width, height, 24, reach=0.5)  # stays in the 32 px crop
    shape = BucketShape(frames=8, height=32, width=32)
    out = decode_clip(encode_mp4(clip, 12), shape, target_fps=8, rng=random.Random(0))
    assert out.shape == (8, 32, 32, 3) and str(out.dtype) == "torch.uint8"
    red = (out[..., 0].float() > 150) & (out[..., 1].float() < 100)
    assert red.any(), "the red square survived encode -> decode -> resize"
    # moving right: the red mass drifts to larger x over time
    xs = [np.nonzero(red[t].numpy())[1].mean() for t in (0, 7) if red[t].any()]
    assert len(xs) == 2 and xs[1] > xs[0]


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
def test_garbage_bytes_raise_instead_of_returning_frames(decoder):
    shape = BucketShape(4, 16, 16)
    with pytest.raises(UndecodableVideo, match=rf"^{decoder} cannot decode 4096 bytes: \w+"):
        decode_clip(bytes(range(256)) * 16, shape, 8, random.Random(0), decoder)
    truncated = encode_mp4(render_clip("circle", "red", "black", "left", 32, 32, 12), 12)[:300]
    with pytest.raises(UndecodableVideo, match=rf"^{decoder} cannot decode 300 bytes"):
        decode_clip(truncated, shape, 8, random.Random(0), decoder)
    with pytest.raises(UndecodableVideo, match="^empty video$"):
        decode_clip(b"", shape, 8, random.Random(0), decoder)


def test_temporal_sampling_respects_the_target_rate_and_clip_length():
    assert frames_available(24, 12, 8) == 16
    idx = temporal_indices(24, 12.0, 6.0, 5, random.Random(1))
    assert len(idx) == 5 and all(b - a == 2 for a, b in zip(idx, idx[1:])) and idx[-1] < 24
    with pytest.raises(ClipTooShort):
        temporal_indices(10, 12.0, 6.0, 6, random.Random(0))


def test_resize_keeps_aspect_ratio_by_cropping():
    frames = np.zeros((2, 40, 80, 3), np.uint8)
    frames[:, :, 30:50] = 255  # a centred vertical bar
    out = resize_and_crop(frames, 20, 20).numpy()
    assert out.shape == (2, 20, 20, 3)
    # scaled by 0.5 (to cover 20 rows) then centre-cropped: the bar stays 10 px wide in the middle
    assert out[0, 10, 10, 0] > 200 and out[0, 10, 0, 0] < 50 and out[0, 10, 19, 0] < 50

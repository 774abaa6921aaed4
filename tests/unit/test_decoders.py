"""data.decoder: decord, PyAV and torchcodec give the same frames and the same crop of the same clips (real mp4
bytes, encoded here with PyAV/libx264). torchcodec runs where it loads: its registry wheels need a CUDA build of
torch, so on a CPU-only torch the test skips with the reason it does not load."""
import random

import numpy as np
import pytest

from data.buckets import BucketShape
from data.decode import decode_clip, decoder_unavailable
from data.demo_set import render_clip
from data.video_io import encode_mp4

# (source width, height, fps, frames): 16:9, 9:16, a width decord 0.6 miscopies (72 px), odd rates
CLIPS = [(128, 72, 12, 24), (72, 128, 24, 30), (96, 96, 10, 17)]
SHAPE = BucketShape(frames=6, height=32, width=48)


def clips():
    for width, height, fps, frames in CLIPS:
        yield encode_mp4(render_clip("circle", "yellow", "navy", "down", width, height, frames), fps)


def decoded(decoder: str):
    return [decode_clip(video, SHAPE, 8.0, random.Random(seed), decoder).numpy().astype(np.int16)
            for seed, video in enumerate(clips())]


@pytest.mark.parametrize("decoder", ["pyav", "torchcodec"])
def test_each_decoder_gives_decords_frames_and_crop(decoder):
    why = decoder_unavailable(decoder)
    if why:
        pytest.skip(f"{decoder} does not load here: {why}")
    for ours, reference in zip(decoded(decoder), decoded("decord")):
        assert ours.shape == reference.shape == (6, 32, 48, 3)
        # The same frames (the same temporal crop) after the same resize: FFmpeg's colour conversion may round
        # a pixel differently between the wrappers, so a level or two, never a different frame.
        assert np.abs(ours - reference).mean() < 1.0 and np.abs(ours - reference).max() <= 8


def test_a_frame_from_another_time_would_be_caught():
    """The comparison above can fail: in these clips a frame one step away in time differs by far more."""
    for frames in decoded("decord"):
        assert np.abs(frames[1:] - frames[:-1]).mean() > 1.0


def test_an_unknown_or_unloadable_decoder_is_rejected_before_a_run_starts():
    from conf.schema import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.decoder='ffmpeg4'"):
        load_config(["experiment=demo", "data.decoder=ffmpeg4"])
    assert load_config(["experiment=demo", "data.decoder=pyav"]).data.decoder == "pyav"

"""data.decoder: decord, PyAV and torchcodec give the same frames and the same crop of the same clips (real mp4
bytes, encoded here with PyAV/libx264). torchcodec runs where it loads. Here that is torchcodec 0.13 (the last
CPU build on the registry, a dev dependency) with the FFmpeg 8 libraries PyAV's wheel bundles, which the dynamic
linker finds only by their sonames: the torchcodec comparison then runs in a child process whose
LD_LIBRARY_PATH holds links by those names."""
import importlib.util
import os
import random
import re
import subprocess
import sys
from pathlib import Path

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
def test_each_decoder_gives_decords_frames_and_crop(decoder, tmp_path):
    why = decoder_unavailable(decoder)
    if why and decoder == "torchcodec" and not os.environ.get(IN_CHILD):
        # Its CPU wheel needs FFmpeg's libraries by soname, which this machine has only inside PyAV's wheel: the
        # same test runs in a child process that finds them there (a machine with FFmpeg installed runs it here).
        run_with_pyavs_ffmpeg(tmp_path, "test_each_decoder_gives_decords_frames_and_crop[torchcodec]")
        return
    assert why is None, f"{decoder} does not load: {why}"
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


def pyav_ffmpeg_links(directory: Path) -> Path:
    """Links named by the sonames torchcodec's libraries need (libavcodec.so.62, ...) to the FFmpeg libraries in
    PyAV's wheel (auditwheel renamed them libavcodec-<hash>.so.62.x.y)."""
    import av

    bundled = Path(av.__file__).resolve().parent.parent / "av.libs"
    for library in bundled.glob("lib*.so*"):
        found = re.match(r"lib(av[a-z]+|sw[a-z]+)-[0-9a-f]+\.so\.(\d+)", library.name)
        if found:
            (directory / f"lib{found.group(1)}.so.{found.group(2)}").symlink_to(library)
    return bundled


IN_CHILD = "KINO_TEST_TORCHCODEC_CHILD"


def run_with_pyavs_ffmpeg(tmp_path, test: str) -> None:
    bundled = pyav_ffmpeg_links(tmp_path)
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join([str(tmp_path), str(bundled),
                                                            os.environ.get("LD_LIBRARY_PATH", "")]), **{IN_CHILD: "1"})
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{test}"],
                            cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]

"""Encode frames to mp4 (h264) and gif; read whole videos with PyAV for cutting clips."""
from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path
from typing import List

import numpy as np


def encode_mp4(frames: np.ndarray, fps: float) -> bytes:
    """(T, H, W, 3) uint8 -> mp4 bytes (h264 yuv420p when available, else mpeg4)."""
    import av

    frames = np.asarray(frames, dtype=np.uint8)
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"mp4 (yuv420p) needs even sides, got {width}x{height}")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "20", "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def write_video(path, frames: np.ndarray, fps: float) -> Path:
    """Write an .mp4 or .gif by the path's suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        import imageio.v2 as imageio

        imageio.mimsave(path, list(np.asarray(frames, dtype=np.uint8)), duration=1.0 / fps, loop=0)
    else:
        path.write_bytes(encode_mp4(frames, fps))
    return path


def read_video(path) -> tuple:
    """All frames of a video file as (T, H, W, 3) uint8, and its frame rate."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 25)
        frames: List[np.ndarray] = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames), fps

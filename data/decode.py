"""Decode a clip from mp4 bytes and fit it to a bucket shape, with the decoder `data.decoder` names:

  decord      the spec's decoder and the default (for the frame widths decord 0.6 miscopies, PyAV reads the
              same bytes instead);
  pyav        FFmpeg through PyAV: maintained, its wheels carry FFmpeg;
  torchcodec  PyTorch's decoder, where it loads (its registry wheels need a CUDA build of torch).

All three read the same frame count and rate from the stream, so the same seeded temporal crop picks the same
frame indices, and the same resize and crop follows: the same clip whichever decodes it
(tests/unit/test_decoders.py)."""
from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from data.buckets import BucketShape


class ClipTooShort(ValueError):
    pass


class UndecodableVideo(ValueError):
    """The bytes are not a video the decoder can read (empty, truncated, not a container, no video stream). The
    loader drops such a sample as `undecodable`, with this message."""


def frames_available(num_frames: int, source_fps: float, target_fps: float) -> int:
    """How many frames at target_fps a clip of num_frames at source_fps yields."""
    if num_frames <= 0:
        return 0
    stride = source_fps / target_fps
    return int(math.floor((num_frames - 1) / stride + 1e-9)) + 1


def temporal_indices(num_frames: int, source_fps: float, target_fps: float, count: int, rng: random.Random):
    """`count` frame indices at target_fps starting at a random point that keeps the clip inside the video."""
    stride = source_fps / target_fps
    span = (count - 1) * stride
    last_start = (num_frames - 1) - span
    if last_start < -1e-9:
        raise ClipTooShort(f"{num_frames} frames at {source_fps:g} fps hold fewer than {count} at {target_fps:g} fps")
    start = rng.uniform(0.0, max(last_start, 0.0))
    return [min(num_frames - 1, int(round(start + i * stride))) for i in range(count)]


def resize_and_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(T, h, w, 3) uint8 -> (T, height, width, 3) uint8, keeping aspect ratio (scale to cover, centre crop)."""
    clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    src_h, src_w = clip.shape[-2:]
    scale = max(height / src_h, width / src_w)
    new_h, new_w = max(height, math.ceil(src_h * scale - 1e-6)), max(width, math.ceil(src_w * scale - 1e-6))
    if (new_h, new_w) != (src_h, src_w):
        clip = F.interpolate(clip, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    clip = clip[:, :, top:top + height, left:left + width]
    return clip.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _decode_with_pyav(video: bytes, count: int, target_fps: float, rng: random.Random) -> np.ndarray:
    import av

    with av.open(io.BytesIO(video)) as container:
        stream = container.streams.video[0]
        source_fps = float(stream.average_rate or target_fps)
        total = stream.frames
        if total:  # the container knows its length: convert only the frames the crop needs
            indices = temporal_indices(total, source_fps, target_fps, count, rng)
            wanted, picked = set(indices), {}
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    picked[i] = frame.to_ndarray(format="rgb24")
                if i >= indices[-1]:
                    break
            if len(picked) == len(wanted):
                return np.stack([picked[i] for i in indices])
            raise ValueError(f"the stream ended before frame {indices[-1]} of {total}")
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("no frames decoded")
    indices = temporal_indices(len(frames), source_fps, target_fps, count, rng)
    return np.stack([frames[i] for i in indices])


def _decord_buffer_bug(error: Exception) -> bool:
    # decord 0.6 miscopies RGB frames for some widths (e.g. 48, 72 px): its buffer comes back padded.
    return "DECORDArrayCopyFromTo" in str(error)


DECODERS = ("decord", "pyav", "torchcodec")


def decoder_unavailable(name: str):
    """Why `name` cannot decode here (None when it can): checked before a run starts."""
    if name not in DECODERS:
        return f"unknown decoder {name!r}; known: {', '.join(DECODERS)}"
    try:
        if name == "torchcodec":
            from torchcodec.decoders import VideoDecoder  # noqa: F401
        else:
            __import__("decord" if name == "decord" else "av")
    except Exception as error:  # ImportError, or OSError from a native library (torchcodec: libc10_cuda.so)
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    return None


def _decode_with_torchcodec(video: bytes, count: int, target_fps: float, rng: random.Random) -> np.ndarray:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(video, seek_mode="exact")
    metadata = decoder.metadata
    source_fps = float(metadata.average_fps or target_fps)
    indices = temporal_indices(int(metadata.num_frames), source_fps, target_fps, count, rng)
    return decoder.get_frames_at(indices=indices).data.permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC


def decode_clip(video: bytes, shape: BucketShape, target_fps: float, rng: random.Random,
                decoder: str = "decord") -> torch.Tensor:
    """A random temporal crop of `shape.frames` frames at target_fps, resized and cropped to the bucket."""
    if not video:
        raise UndecodableVideo("empty video")
    read = {"pyav": _decode_with_pyav, "torchcodec": _decode_with_torchcodec}.get(decoder, _decode_with_decord)
    try:
        frames = read(video, shape.frames, target_fps, rng)
    except ClipTooShort:
        raise
    except Exception as error:  # each decoder raises its own types (decord's RuntimeError, PyAV's av.error.*)
        said = (str(error) or repr(error)).splitlines()[0][:200]
        raise UndecodableVideo(f"{decoder} cannot decode {len(video)} bytes: {type(error).__name__}: {said}") \
            from error
    return resize_and_crop(frames, shape.height, shape.width)


def _decode_with_decord(video: bytes, count: int, target_fps: float, rng: random.Random) -> np.ndarray:
    import decord  # imported here so worker processes load it lazily

    state = rng.getstate()
    try:
        reader = decord.VideoReader(io.BytesIO(video), ctx=decord.cpu(0), num_threads=1)
        num_frames = len(reader)
        source_fps = reader.get_avg_fps() or target_fps
        indices = temporal_indices(num_frames, source_fps, target_fps, count, rng)
        return reader.get_batch(indices).asnumpy()
    except decord.DECORDError as error:
        if not _decord_buffer_bug(error):
            raise
        rng.setstate(state)  # the same temporal crop whichever decoder reads it
        return _decode_with_pyav(video, count, target_fps, rng)

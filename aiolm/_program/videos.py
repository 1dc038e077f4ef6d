"""Sampling a ``video(...)`` source (a file's path or bytes, or frames) into ``VideoData``.

Files are decoded with PyAV (FFmpeg's libraries; the ``engine`` extra installs it) on a
worker thread, so the event loop never waits on decoding.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import anyio

from ..values import VideoData

__all__ = ["DEFAULT_NUM_FRAMES", "load_video", "sample_indices"]

#: Frames sampled from a video file when ``num_frames`` is not given.
DEFAULT_NUM_FRAMES = 8


def sample_indices(total: int, count: int) -> list[int]:
    """``min(count, total)`` frame indices evenly spread over ``0 .. total - 1`` (the first
    and the last frame included)."""
    count = min(count, total)
    if count <= 0:
        return []
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


async def load_video(source: Any, num_frames: int | None) -> VideoData:
    """Sample ``source`` into a :class:`VideoData` (see :func:`aiolm.video`).

    Raises ``FileNotFoundError`` for a missing path, ``ValueError`` for a file PyAV cannot
    read, a file without video frames, or frames of different sizes.
    """
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not await anyio.Path(path).is_file():
            raise FileNotFoundError(f"video: no such file: {path!r}")
        return await anyio.to_thread.run_sync(_from_file, path, path, num_frames)
    if isinstance(source, bytes):
        return await anyio.to_thread.run_sync(_from_file, io.BytesIO(source),
                                              f"<{len(source)} bytes>", num_frames)
    return await anyio.to_thread.run_sync(_from_frames, source, num_frames)


def _from_file(file: Any, shown: str, num_frames: int | None) -> VideoData:
    import av

    try:
        with av.open(file) as container:
            if not container.streams.video:
                raise ValueError(f"video: {shown} has no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            total = stream.frames or sum(1 for _ in container.decode(stream))
            if total == 0:
                raise ValueError(f"video: {shown} has no video frames")
            wanted = set(sample_indices(total, num_frames or DEFAULT_NUM_FRAMES))
            if stream.frames == 0:   # counted by decoding: decode again from the start
                container.seek(0)
            frames, picked_at = [], []
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                    picked_at.append(index)
                if len(frames) == len(wanted):
                    break
    except av.FFmpegError as exc:
        raise ValueError(f"video: cannot read {shown}: {exc}") from None
    if not frames:
        raise ValueError(f"video: {shown} has no video frames")
    # The rate of the sampled frames: how many of them fall in a second of the clip.
    fps = None
    if rate and len(picked_at) > 1:
        span = (picked_at[-1] - picked_at[0]) / rate
        fps = (len(picked_at) - 1) / span if span > 0 else None
    elif rate:
        fps = rate
    return _video_data(frames, fps)


def _from_frames(frames: Sequence[Any], num_frames: int | None) -> VideoData:
    import numpy as np

    picked = [frames[i] for i in sample_indices(len(frames), num_frames or len(frames))]
    arrays = []
    for i, frame in enumerate(picked):
        array = np.asarray(frame.convert("RGB")) if hasattr(frame, "convert") else np.asarray(frame)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"video: frame {i} must be H x W x 3 uint8 (RGB), got "
                             f"{array.dtype} {array.shape}")
        arrays.append(array)
    return _video_data(arrays, None)


def _video_data(arrays: list[Any], fps: float | None) -> VideoData:
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"video: frames of different sizes {sorted(sizes)}")
    height, width = arrays[0].shape[:2]
    return VideoData(frames=tuple(a.tobytes() for a in arrays), width=width, height=height,
                     fps=fps)

"""Values that every layer shares: the engine produces them, backends and programs read them.

They live below both ``aiolm.engine`` and ``aiolm.backends`` so that neither imports the other
for them (the engine knows nothing of backends).
"""

from __future__ import annotations

import hashlib

import attrs

__all__ = ["ImageData", "TokenLogprob", "Usage", "VideoData", "hit_rate"]


def hit_rate(cached_tokens: int, prompt_tokens: int) -> float:
    """The prefix-cache hit rate: the fraction of prompt tokens served from the cache (0.0
    with no prompt tokens). aiolm's one definition of it: the radix cache, the engine's
    statistics, the server's metrics and the benchmarks all report this."""
    return cached_tokens / prompt_tokens if prompt_tokens else 0.0


@attrs.frozen(kw_only=True)
class ImageData:
    """A loaded image: raw bytes and their MIME type, or a URL the backend fetches itself."""

    data: bytes | None = None
    mime: str = "image/png"
    url: str | None = None

    @property
    def digest(self) -> str:
        """A stable content hash (used as the image's key in the engine's prefix cache)."""
        return hashlib.sha256(self.data if self.data is not None else (self.url or "").encode()).hexdigest()


def _check_frames(instance: VideoData, attribute: attrs.Attribute, frames: tuple) -> None:
    if not frames:
        raise ValueError("video: no frames")
    size = instance.width * instance.height * 3
    if instance.width <= 0 or instance.height <= 0 or any(len(f) != size for f in frames):
        raise ValueError(f"video: each frame must be {instance.width}x{instance.height} RGB "
                         f"bytes ({size} bytes)")


@attrs.frozen(kw_only=True)
class VideoData:
    """The sampled frames of a video: raw RGB bytes (``width * height * 3`` each, rows top
    to bottom), and the rate they were sampled at (frames a second; None when unknown)."""

    frames: tuple[bytes, ...] = attrs.field(converter=tuple, validator=_check_frames,
                                            repr=lambda f: f"<{len(f)} frames>")
    width: int
    height: int
    fps: float | None = None

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def digest(self) -> str:
        """A stable hash of the sampled frames (the video's key in the engine's prefix
        cache): the same frames at the same size give the same digest."""
        h = hashlib.sha256(f"video {self.width}x{self.height} {len(self.frames)};".encode())
        for frame in self.frames:
            h.update(frame)
        return h.hexdigest()


@attrs.frozen(kw_only=True)
class TokenLogprob:
    """The logprob of one generated token, and the top alternatives if asked for."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@attrs.frozen(kw_only=True)
class Usage:
    """Token counts of one request. ``cached_tokens`` were served from the prefix cache."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def cache_hit_rate(self) -> float:
        """:func:`hit_rate` of these counts."""
        return hit_rate(self.cached_tokens, self.prompt_tokens)

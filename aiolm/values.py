"""Values that every layer shares: the engine produces them, backends and programs read them.

They live below both ``aiolm.engine`` and ``aiolm.backends`` so that neither imports the other
for them (the engine knows nothing of backends).
"""

from __future__ import annotations

import hashlib

import attrs

__all__ = ["ImageData", "TokenLogprob", "Usage", "hit_rate"]


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

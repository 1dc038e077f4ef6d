"""Values that every layer shares: the engine produces them, backends and programs read them.

They live below both ``aiolm.engine`` and ``aiolm.backends`` so that neither imports the other
for them (the engine knows nothing of backends).
"""

from __future__ import annotations

import hashlib

import attrs

__all__ = ["ImageData", "TokenLogprob", "Usage"]


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

"""Loading an ``image(...)`` source (path, bytes, URL, PIL image) into ``ImageData``."""

from __future__ import annotations

import base64
import binascii
import io
import mimetypes
import os
from typing import Any

import anyio

from ..backends.base import ImageData

__all__ = ["load_image", "sniff_mime"]

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def sniff_mime(data: bytes) -> str:
    """The MIME type of encoded image bytes, from their magic number (PNG if unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    return "image/png"


async def load_image(source: Any) -> ImageData:
    """Read ``source`` into an :class:`ImageData`.

    http(s) URLs are passed on for the backend to fetch; ``data:`` URLs are decoded; paths are
    read without blocking the event loop; PIL images are encoded as PNG. Raises
    ``FileNotFoundError`` for a missing path and ``ValueError`` for a malformed data URL.
    """
    if isinstance(source, bytes):
        return ImageData(data=source, mime=sniff_mime(source))
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return ImageData(url=source)
    if isinstance(source, str) and source.startswith("data:"):
        return _from_data_url(source)
    if isinstance(source, str | os.PathLike):
        data = await anyio.Path(os.fspath(source)).read_bytes()
        mime = mimetypes.guess_type(os.fspath(source))[0]
        if mime is None or not mime.startswith("image/"):
            mime = sniff_mime(data)
        return ImageData(data=data, mime=mime)
    buf = io.BytesIO()  # a PIL image (checked when image() was built)
    source.save(buf, format="PNG")
    return ImageData(data=buf.getvalue(), mime="image/png")


def _from_data_url(url: str) -> ImageData:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError("image: a data URL must look like data:image/png;base64,<data>")
    mime = header[len("data:"):-len(";base64")] or "image/png"
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"image: the data URL is not valid base64: {exc}") from None
    return ImageData(data=data, mime=mime)

"""Counting OpenAI tokens with tiktoken — only when its encoding is already on this machine.

tiktoken downloads encodings on first use; aiolm never downloads at run time, so an encoding
is used only when its file is in tiktoken's cache directory (``TIKTOKEN_CACHE_DIR``,
``DATA_GYM_CACHE_DIR``, or ``<tmp>/data-gym-cache``) or the encoding is a plugin that needs
no file. Everything else — an unknown model, no tiktoken, no cached file — gives ``None``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from typing import Any

__all__ = ["local_encoding", "token_texts"]

_BLOB = "https://openaipublic.blob.core.windows.net/encodings/"
# The files tiktoken's built-in encodings read (tiktoken_ext.openai_public).
_ENCODING_FILES = {
    "r50k_base": (_BLOB + "r50k_base.tiktoken",),
    "p50k_base": (_BLOB + "p50k_base.tiktoken",),
    "p50k_edit": (_BLOB + "p50k_base.tiktoken",),
    "cl100k_base": (_BLOB + "cl100k_base.tiktoken",),
    "o200k_base": (_BLOB + "o200k_base.tiktoken",),
    "o200k_harmony": (_BLOB + "o200k_base.tiktoken",),
}


def _cache_dir() -> str:
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _is_cached(url: str) -> bool:
    cache = _cache_dir()
    if not cache:
        return False
    return os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))


@functools.lru_cache(maxsize=32)
def local_encoding(model: str) -> Any | None:
    """The tiktoken ``Encoding`` for ``model`` if it loads without the network, else None."""
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return None
    files = _ENCODING_FILES.get(name)
    if files is None or not all(_is_cached(f) for f in files):
        return None
    try:
        return tiktoken.get_encoding(name)
    except Exception:  # a corrupt cache file: count nothing rather than fail
        return None


def token_texts(encoding: Any, text: str) -> tuple[str, ...] | None:
    """``text`` split at its token boundaries (None if they do not fall on characters).

    Byte-level tokens can split a multi-byte character; then the boundaries are not
    expressible as string offsets and the caller must treat the count as unknown.
    """
    pieces = []
    for token in encoding.encode(text, disallowed_special=()):
        try:
            pieces.append(encoding.decode_single_token_bytes(token).decode("utf-8"))
        except UnicodeDecodeError:
            return None
    return tuple(pieces) if "".join(pieces) == text else None

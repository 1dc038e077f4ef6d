"""Sampling parameters shared by every backend (a frozen value object, validated on creation)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs

__all__ = ["SamplingParams", "normalize_stop"]


def normalize_stop(stop: str | Iterable[str] | None) -> tuple[str, ...]:
    """Turn ``None``, a string, or an iterable of strings into a tuple of non-empty strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    out = tuple(stop)
    for s in out:
        if not isinstance(s, str):
            raise TypeError(f"stop: expected strings, got {type(s).__name__}")
        if not s:
            raise ValueError("stop: stop strings must be non-empty")
    return out


def _non_negative_int(name: str):
    def check(_inst, _attr, value):
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name}: must be >= 0, got {value}")

    return check


def _finite_float(name: str, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False):
    def check(_inst, _attr, value):
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name}: must be finite, got {value}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            bound = f"> {lo}" if lo_open else f">= {lo}"
            raise ValueError(f"{name}: must be {bound}, got {value}")
        if hi is not None and value > hi:
            raise ValueError(f"{name}: must be <= {hi}, got {value}")

    return check


def _stop_converter(value):
    return normalize_stop(value)


def _ids_converter(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        value = (value,)
    out = tuple(value)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"stop_token_ids: expected non-negative ints, got {v!r}")
    return out


def _check_stop_regex(_inst, _attr, value):
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"stop_regex: expected a string, got {type(value).__name__}")
    import regex

    try:
        regex.compile(value)
    except regex.error as exc:
        raise ValueError(f"stop_regex: does not compile: {exc}") from None


@attrs.frozen(kw_only=True)
class SamplingParams:
    """How to sample one completion.

    ``temperature == 0`` means greedy. ``top_k == 0`` (or -1) disables top-k.
    ``max_tokens`` counts generated tokens; ``min_tokens`` suppresses EOS and stop
    conditions until that many tokens exist. ``seed`` makes a sampled request reproducible.
    """

    max_tokens: int = attrs.field(default=128, validator=_non_negative_int("max_tokens"))
    temperature: float = attrs.field(default=0.0, validator=_finite_float("temperature", lo=0.0))
    top_p: float = attrs.field(default=1.0, validator=_finite_float("top_p", 0.0, 1.0, lo_open=True))
    top_k: int = attrs.field(default=0)
    min_p: float = attrs.field(default=0.0, validator=_finite_float("min_p", 0.0, 1.0))
    frequency_penalty: float = attrs.field(
        default=0.0, validator=_finite_float("frequency_penalty", -2.0, 2.0)
    )
    presence_penalty: float = attrs.field(
        default=0.0, validator=_finite_float("presence_penalty", -2.0, 2.0)
    )
    ignore_eos: bool = False
    min_tokens: int = attrs.field(default=0, validator=_non_negative_int("min_tokens"))
    stop: tuple[str, ...] = attrs.field(default=(), converter=_stop_converter)
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=_ids_converter)
    stop_regex: str | None = attrs.field(default=None, validator=_check_stop_regex)
    logprobs: bool = False
    top_logprobs: int = attrs.field(default=0, validator=_non_negative_int("top_logprobs"))
    seed: int | None = attrs.field(default=None, validator=_non_negative_int("seed"))

    @top_k.validator
    def _check_top_k(self, _attr, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"top_k: expected an int, got {type(value).__name__}")
        if value < -1:
            raise ValueError(f"top_k: must be >= 0 (0 or -1 disables it), got {value}")

    def __attrs_post_init__(self) -> None:
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if self.top_logprobs > 20:
            raise ValueError(f"top_logprobs: at most 20, got {self.top_logprobs}")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1

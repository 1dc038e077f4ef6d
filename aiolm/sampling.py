"""Sampling parameters shared by every backend (a frozen value object, validated on creation).

Every value is range-checked here, at the entry, so that no request can reach an engine with a
value that breaks it: the bounds are OpenAI's where OpenAI has one, and otherwise limits that
keep one request's host-side work (stop checks, the sampler's preparation) small:

========================  ===================================================================
``max_tokens``            ``0 ..`` :data:`MAX_TOKENS` (a 32-bit int)
``min_tokens``            ``0 .. max_tokens``
``temperature``           ``>= 0`` and finite; below :data:`GREEDY_TEMPERATURE` it is greedy
                          (no upper bound: local-model servers such as vLLM and SGLang
                          take any; OpenAI's own API refuses more than 2)
``top_p``                 ``(0, 1]``
``top_k``                 ``-1 ..`` :data:`MAX_TOKENS` (0 and -1 disable it)
``min_p``                 ``0 .. 1``
``frequency_penalty``     ``-2 .. 2`` (as OpenAI)
``presence_penalty``      ``-2 .. 2`` (as OpenAI)
``stop``                  at most :data:`MAX_STOP_STRINGS` non-empty strings of at most
                          :data:`MAX_STOP_CHARS` characters each
``stop_token_ids``        at most :data:`MAX_STOP_TOKEN_IDS` ids, each ``0 ..`` :data:`MAX_TOKENS`
``stop_regex``            at most :data:`MAX_STOP_REGEX_CHARS` characters that compile, whose
                          counted repeats unroll to at most :data:`MAX_STOP_REGEX_SIZE` atoms
``top_logprobs``          ``0 ..`` :data:`MAX_TOP_LOGPROBS` (as OpenAI)
``logit_bias``            at most :data:`MAX_LOGIT_BIAS` entries; ids ``0 ..``
                          :data:`MAX_TOKENS` (the engine refuses ids outside its model's
                          vocabulary when the request is submitted), biases finite and in
                          ``-100 .. 100`` (as OpenAI)
``seed``                  ``0 .. 2**64 - 1`` (an unsigned 64-bit int: every seed
                          ``torch.Generator.manual_seed`` takes as it is)
========================  ===================================================================
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping

import attrs

__all__ = [
    "GREEDY_TEMPERATURE",
    "MAX_LOGIT_BIAS",
    "MAX_STOP_CHARS",
    "MAX_STOP_REGEX_CHARS",
    "MAX_STOP_REGEX_SIZE",
    "MAX_STOP_STRINGS",
    "MAX_STOP_TOKEN_IDS",
    "MAX_TOKENS",
    "MAX_TOP_LOGPROBS",
    "SEED_RANGE",
    "SamplingParams",
    "normalize_stop",
]

#: The largest ``max_tokens``, ``top_k`` and stop token id (a 32-bit int).
MAX_TOKENS = 2**31 - 1
#: The most stop strings, and the longest one (stop checks cost up to its length squared).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 512
#: The most ``stop_token_ids``.
MAX_STOP_TOKEN_IDS = 256
#: The longest ``stop_regex``. The ``regex`` module's first partial search of a pattern costs
#: the cube of its longest literal, holding the GIL and ignoring any timeout (a 512-character
#: literal: ~30 ms; 3,000: seconds).
MAX_STOP_REGEX_CHARS = 512
#: How many atoms a ``stop_regex``'s counted repeats (``x{n}``, nested) may unroll to:
#: ``regex`` unrolls them when it compiles, so ``(?:(?:a{200}){200}){200}`` takes seconds
#: and ``a{4294967294}`` all the memory there is.
MAX_STOP_REGEX_SIZE = 10_000
#: Temperatures below this sample greedily (as in vLLM): the draw is then the argmax in all
#: but name, and a temperature that rounds to 0 in float32 (1e-50) would make every
#: probability NaN.
GREEDY_TEMPERATURE = 1e-5
#: The most ``top_logprobs`` (OpenAI's bound).
MAX_TOP_LOGPROBS = 20
#: Seeds accepted: every unsigned 64-bit int.
SEED_RANGE = range(2**64)
#: The most ``logit_bias`` entries (the sampler adds each one on the device every step).
MAX_LOGIT_BIAS = 1024
#: The largest ``logit_bias`` magnitude (OpenAI's bound).
_LOGIT_BIAS_RANGE = 100.0


def normalize_stop(stop: str | Iterable[str] | None) -> tuple[str, ...]:
    """Turn ``None``, a string, or an iterable of strings into a tuple of non-empty strings.

    Raises ``TypeError`` for a non-string, ``ValueError`` for an empty string, more than
    :data:`MAX_STOP_STRINGS` of them or one longer than :data:`MAX_STOP_CHARS`.
    """
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    out = tuple(stop)
    if len(out) > MAX_STOP_STRINGS:
        raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(out)}")
    for s in out:
        if not isinstance(s, str):
            raise TypeError(f"stop: expected strings, got {type(s).__name__}")
        if not s:
            raise ValueError("stop: stop strings must be non-empty")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop: a stop string has {len(s)} characters; at most "
                             f"{MAX_STOP_CHARS}")
    return out


def _int_in(name: str, lo: int, hi: int, *, optional: bool = False):
    def check(_inst, _attr, value):
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
        if not lo <= value <= hi:
            raise ValueError(f"{name}: must be in [{lo}, {hi}], got {value}")

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
    if len(out) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got {len(out)}")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOKENS:
            raise ValueError(f"stop_token_ids: expected ints in [0, {MAX_TOKENS}], got {v!r}")
    return out


def _logit_bias_converter(value) -> tuple[tuple[int, float], ...]:
    """``{token_id: bias}`` or ``[(token_id, bias), ...]`` as a sorted tuple of pairs."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise TypeError(f"logit_bias: expected a mapping of token ids to biases, got "
                        f"{type(value).__name__}")
    else:
        pairs = list(itertools.islice(value, MAX_LOGIT_BIAS + 1))
    if len(pairs) > MAX_LOGIT_BIAS:
        got = len(value) if isinstance(value, Mapping) else "more"
        raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {got}")
    out: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise TypeError(f"logit_bias: expected (token_id, bias) pairs, got {pair!r}")
        token, bias = pair
        if isinstance(token, bool) or not isinstance(token, int):
            raise TypeError(f"logit_bias: token ids must be ints, got {token!r}")
        if not 0 <= token <= MAX_TOKENS:
            raise ValueError(f"logit_bias: token id {token} is not in [0, {MAX_TOKENS}]")
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise TypeError(f"logit_bias: the bias of token {token} must be a number, got "
                            f"{type(bias).__name__}")
        if not (math.isfinite(bias) and -_LOGIT_BIAS_RANGE <= bias <= _LOGIT_BIAS_RANGE):
            raise ValueError(f"logit_bias: the bias of token {token} must be in "
                             f"[-{_LOGIT_BIAS_RANGE:g}, {_LOGIT_BIAS_RANGE:g}], got {bias}")
        if token in out:
            raise ValueError(f"logit_bias: token id {token} is given twice")
        out[token] = float(bias)
    return tuple(sorted(out.items()))


# A counted repeat: {m}, {m,}, {,n}, {m,n} (anything else in braces is a literal or a
# fuzzy constraint, which unrolls nothing).
_COUNTED = re.compile(r"\{(\d*)(,?)(\d*)\}")
# Escapes whose argument is in braces (\p{L}, \N{DASH}, \x{263a}): not a repeat.
_BRACED_ESCAPES = frozenset("pPNx")


def _unrolled_size(pattern: str) -> int:
    """An upper estimate of how many atoms ``regex`` unrolls ``pattern`` into.

    Every character, escape and character class counts one; a counted repeat ``{m,n}``
    multiplies what it repeats by ``n`` (by ``m`` when unbounded), nested ones multiply
    together, alternatives add up. Deliberately coarse (it only reads the pattern's text):
    it never under-counts a well-formed pattern.
    """
    groups = [0]          # the size of each open group's text so far
    last = 0              # the size of the atom a quantifier would repeat
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            if pattern[i - 1: i] in _BRACED_ESCAPES and pattern[i: i + 1] == "{":
                end = pattern.find("}", i)
                i = n if end < 0 else end + 1
            last = 1
        elif c == "[":
            i = _class_end(pattern, i)
            last = 1
        elif c in "*+?":  # repeats nothing more; keeps ``last`` for a repeat after it
            i += 1
            continue
        elif c == "(":
            groups.append(0)
            i += 1
            last = 0
            continue
        elif c == ")" and len(groups) > 1:
            last = max(groups.pop(), 1)
            i += 1
        elif c == "{" and (m := _COUNTED.match(pattern, i)) and (m[1] or m[3]):
            count = int(m[3]) if m[3] else int(m[1])
            groups[-1] += last * (max(count, 1) - 1)
            last *= max(count, 1)
            i = m.end()
            if groups[-1] > MAX_STOP_REGEX_SIZE:
                return groups[-1]
            continue
        else:
            i += 1
            last = 1
        groups[-1] += last
    return sum(groups)


def _class_end(pattern: str, i: int) -> int:
    """The index after the character class that opens at ``pattern[i] == "["``."""
    j = i + 1
    if pattern[j: j + 1] == "^":
        j += 1
    if pattern[j: j + 1] == "]":
        j += 1
    while j < len(pattern):
        if pattern[j] == "\\":
            j += 2
        elif pattern[j] == "]":
            return j + 1
        else:
            j += 1
    return len(pattern)


# ``(?R)``, ``(?1)``, ``(?+1)``, ``(?-1)``, ``(?&name)``, ``(?P>name)``.
_GROUP_CALL = re.compile(r"\(\?(?:R|&|P>|[+-]?\d)")


def _calls_a_group(pattern: str) -> bool:
    """Whether ``pattern`` recurses or calls a group as a subroutine (``(?R)``, ``(?1)``,
    ``(?+1)``, ``(?&name)``, ``(?P>name)``): ``regex`` supports them, and ``(?R)`` alone
    exhausts memory on the empty string. A stop condition never needs them."""
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
        elif pattern[i] == "[":
            i = _class_end(pattern, i)
        elif _GROUP_CALL.match(pattern, i):
            return True
        else:
            i += 1
    return False


def _check_stop_regex(_inst, _attr, value):
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"stop_regex: expected a string, got {type(value).__name__}")
    if len(value) > MAX_STOP_REGEX_CHARS:
        raise ValueError(f"stop_regex: {len(value)} characters; at most "
                         f"{MAX_STOP_REGEX_CHARS} (simplify it)")
    if _calls_a_group(value):
        raise ValueError("stop_regex: recursion and group calls ((?R), (?1), (?&name)) are "
                         "not allowed")
    size = _unrolled_size(value)
    if size > MAX_STOP_REGEX_SIZE:
        raise ValueError(f"stop_regex: its counted repeats unroll to {size} or more atoms; at "
                         f"most {MAX_STOP_REGEX_SIZE} (use * or + instead of large {{n}})")
    import regex

    try:
        regex.compile(value)
    except regex.error as exc:
        raise ValueError(f"stop_regex: does not compile: {exc}") from None


@attrs.frozen(kw_only=True)
class SamplingParams:
    """How to sample one completion.

    ``temperature == 0`` (or below :data:`GREEDY_TEMPERATURE`) means greedy. ``top_k == 0``
    (or -1) disables top-k.
    ``max_tokens`` counts generated tokens (0: only the prompt is computed);
    ``min_tokens`` suppresses EOS and stop conditions until that many tokens exist.
    ``seed`` makes a sampled request reproducible. ``logit_bias`` (OpenAI's) adds a bias to
    the logits of given tokens before any mask or truncation; it is given as a mapping
    ``{token_id: bias}`` (or ``(token_id, bias)`` pairs) and kept as a tuple of pairs sorted
    by token id. A -100 bias all but bans a token, +100 all but forces it.
    Every value is range-checked (the bounds are in this module's docstring); a bad one
    raises ``TypeError`` / ``ValueError`` naming it.
    """

    max_tokens: int = attrs.field(default=128, validator=_int_in("max_tokens", 0, MAX_TOKENS))
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
    min_tokens: int = attrs.field(default=0, validator=_int_in("min_tokens", 0, MAX_TOKENS))
    stop: tuple[str, ...] = attrs.field(default=(), converter=_stop_converter)
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=_ids_converter)
    stop_regex: str | None = attrs.field(default=None, validator=_check_stop_regex)
    logprobs: bool = False
    top_logprobs: int = attrs.field(
        default=0, validator=_int_in("top_logprobs", 0, MAX_TOP_LOGPROBS))
    logit_bias: tuple[tuple[int, float], ...] = attrs.field(
        default=(), converter=_logit_bias_converter)
    seed: int | None = attrs.field(
        default=None,
        validator=_int_in("seed", SEED_RANGE.start, SEED_RANGE.stop - 1, optional=True))
    skip_special_tokens: bool = attrs.field(default=True)

    @skip_special_tokens.validator
    def _check_skip_special_tokens(self, _attr, value):
        if not isinstance(value, bool):
            raise TypeError(f"skip_special_tokens: expected a bool, got {type(value).__name__}")

    @top_k.validator
    def _check_top_k(self, _attr, value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"top_k: expected an int, got {type(value).__name__}")
        if value < -1:
            raise ValueError(f"top_k: must be >= 0 (0 or -1 disables it), got {value}")
        if value > MAX_TOKENS:
            raise ValueError(f"top_k: must be <= {MAX_TOKENS}, got {value}")

    def __attrs_post_init__(self) -> None:
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature about 0, or top_k 1)."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

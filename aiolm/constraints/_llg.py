"""The built-in constraints on llguidance: spec → grammar, validation, compilation, caches.

Why llguidance: it is maintained (Microsoft's guidance team; used by vLLM, SGLang,
llama.cpp), computes a token mask over a 50k–200k vocabulary in tens of microseconds with
no per-grammar precomputation, covers most of JSON Schema (``$ref``/``$defs``, ``anyOf``/
``oneOf``, string formats and patterns, numeric bounds, ``minItems``/``maxItems``) and Lark
grammars, and gives forced ("fast-forward") tokens for jump-forward decoding.

JSON layout. Generated JSON is on one line with the separators ``", "`` and ``": "``
(``{"name": "Ada", "age": 36}``, the layout of Python's ``json.dumps``), with no other
whitespace: it is what chat models write unprompted, and it makes every key and separator a
forced run of text for jump-forward. A schema may choose otherwise with llguidance's
``"x-guidance"`` key, e.g. ``{"x-guidance": {"whitespace_flexible": true}}`` (any JSON
whitespace) or ``{"x-guidance": {"item_separator": ",", "key_separator": ":"}}`` (compact).
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from collections import OrderedDict
from typing import Any

import attrs

from ..errors import ConstraintError
from ._llg_matcher import LLGMatcher
from ._pyregex import to_rust_regex
from .base import Constraint
from .choices import Choices
from .grammar import Grammar
from .json_schema import JSONSchema
from .regex import Regex

__all__ = ["JSON_DEFAULTS", "compile_spec", "grammar_for", "text_matches", "validate_spec"]

#: llguidance JSON options used unless the schema's ``"x-guidance"`` says otherwise.
JSON_DEFAULTS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}

_MAX_TEMPLATES = 256  # compiled grammars kept per tokenizer (LRU)


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - the engine extra installs it
        raise ConstraintError(
            "constrained decoding needs llguidance: pip install 'aiolm[engine]'"
        ) from exc
    return llguidance


def _describe(kind: str, message: str) -> str:
    """Turn an llguidance validation message into one line naming the problem."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error: "):  # Rust regex-syntax: the line that says what is wrong
            return f"{kind}: {line[len('error: '):]}"
    head = lines[0] if lines else "invalid"
    if head.startswith("Unimplemented keys: "):
        keys = ", ".join(json.loads(head[len("Unimplemented keys: "):]))
        return f"{kind}: unsupported JSON Schema keyword(s): {keys}"
    return f"{kind}: {head}"


@functools.lru_cache(maxsize=1024)
def grammar_for(spec: Constraint, *, for_checking: bool = False) -> str:
    """The llguidance grammar text of a built-in spec (not yet validated).

    ``for_checking`` relaxes the JSON layout (any whitespace): text produced elsewhere is
    valid whatever its layout. Raises :class:`ConstraintError` for a regex this engine
    cannot express, :class:`TypeError` for a spec that is not built in.
    """
    llg = _llguidance()
    if isinstance(spec, Regex):
        return llg.LLMatcher.grammar_from_regex(to_rust_regex(spec.pattern))
    if isinstance(spec, Choices):
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choices)
        return llg.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    if isinstance(spec, Grammar):
        try:
            return llg.grammar_from("grammar", spec.grammar)
        except ValueError as exc:
            raise ConstraintError(_describe("grammar", str(exc))) from None
    if isinstance(spec, JSONSchema):
        overrides = {"whitespace_flexible": True} if for_checking else None
        try:
            return llg.LLMatcher.grammar_from_json_schema(
                spec.schema_json, defaults=JSON_DEFAULTS, overrides=overrides
            )
        except ValueError as exc:
            raise ConstraintError(_describe("json_schema", str(exc))) from None
    raise TypeError(
        f"constraint: {type(spec).__name__} is not a built-in constraint; "
        f"its own compile() must build its matcher"
    )


_NOTHING = {
    Regex: "the pattern matches no string (an empty character class like [^\\s\\S]?)",
    JSONSchema: "no JSON value is valid under the schema (a $ref cycle with no other way out?)",
    Grammar: "the grammar derives no sentence (a rule that only refers to itself?)",
}


def _kind(spec: Constraint) -> str:
    if isinstance(spec, Regex):
        return f"regex {spec.pattern!r}"
    return {Choices: "choices", Grammar: "grammar", JSONSchema: "json_schema"}[type(spec)]


@functools.lru_cache(maxsize=1024)
def validate_spec(spec: Constraint) -> None:
    """Raise :class:`ConstraintError` naming the problem if llguidance cannot compile ``spec``
    or no output can satisfy it.

    Needs no tokenizer, so programs call it when they submit a ``gen``, before any token.
    Cached by spec (only successes are cached: an exception is re-raised each time).
    """
    llg = _llguidance()
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar_for(spec))
    if is_error:
        raise ConstraintError(_describe(_kind(spec), messages[0]))
    # A grammar can be well formed and still allow no output at all (``[^\s\S]``, a
    # ``$ref`` to itself): llguidance would only say so at the first token. One that allows
    # neither the empty output nor any first byte allows nothing (checked over bytes, once
    # per spec: about a millisecond).
    # NOTE: this catches a constraint that cannot start; one that can start but never
    # finish (a required property that recurses forever) still fails while decoding.
    ll = _checker(spec).deep_copy()
    if not ll.is_accepting():
        mask = ll.compute_bitmask()
        if ll.is_error() or not any(mask):
            raise ConstraintError(f"{_kind(spec)}: unsatisfiable: "
                                  f"{_NOTHING.get(type(spec), 'no output can match it')}")


@attrs.define(eq=False)
class _TokenizerEntry:
    """One llguidance tokenizer and the pristine matchers compiled against it."""

    ll_tokenizer: Any
    eos_token_ids: frozenset[int]
    templates: OrderedDict = attrs.field(factory=OrderedDict)


_lock = threading.Lock()
# NOTE: module-level caches, keyed weakly by the HF tokenizer so they die with it; guarded
# by ``_lock`` (the engine thread compiles while the event loop validates).
_entries: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], _TokenizerEntry]] = (
    weakref.WeakKeyDictionary()
)


def _eos_ids(tokenizer: Any, hf: Any) -> tuple[int, ...]:
    """The engine tokenizer's ``eos_token_ids``, or the HF tokenizer's EOS token."""
    ids = getattr(tokenizer, "eos_token_ids", None) if tokenizer is not hf else None
    if ids is None:
        ids = hf.eos_token_id
    if ids is None:
        return ()
    if isinstance(ids, int):
        ids = [ids]
    return tuple(sorted({int(i) for i in ids}))


def _entry(tokenizer: Any) -> _TokenizerEntry:
    """The cached llguidance tokenizer for ``tokenizer`` (built once: ~0.5 s)."""
    hf = getattr(tokenizer, "hf", tokenizer)
    eos = _eos_ids(tokenizer, hf)
    with _lock:
        per_hf = _entries.setdefault(hf, {})
        entry = per_hf.get(eos)
        if entry is None:
            import llguidance.hf

            try:
                llt = llguidance.hf.from_tokenizer(hf, eos_token=list(eos) or None)
            except ValueError as exc:
                raise TypeError(
                    f"tokenizer: llguidance needs a fast Hugging Face tokenizer ({exc})"
                ) from None
            entry = per_hf[eos] = _TokenizerEntry(ll_tokenizer=llt, eos_token_ids=frozenset(eos))
        return entry


def _template(entry: _TokenizerEntry, spec: Constraint, grammar: str, key: Any) -> Any:
    """A pristine compiled matcher of ``grammar`` (never advanced: callers deep-copy it)."""
    with _lock:
        ll = entry.templates.get(key)
        if ll is not None:
            entry.templates.move_to_end(key)
            return ll
    llg = _llguidance()
    ll = llg.LLMatcher(entry.ll_tokenizer, grammar, log_level=0)
    if ll.is_error():
        raise ConstraintError(_describe(_kind(spec), ll.get_error()))
    with _lock:
        entry.templates[key] = ll
        if len(entry.templates) > _MAX_TEMPLATES:
            entry.templates.popitem(last=False)
    return ll


def compile_spec(spec: Constraint, tokenizer: Any) -> LLGMatcher:
    """A fresh :class:`LLGMatcher` for one request.

    ``tokenizer`` is the engine's :class:`aiolm.engine.tokenizer.Tokenizer` (its ``hf``
    and ``eos_token_ids`` are used) or a fast Hugging Face tokenizer. The llguidance
    tokenizer is built once per tokenizer and each grammar once per (tokenizer, spec);
    a request gets a copy (~2 µs). Raises :class:`ConstraintError` for an invalid spec.
    """
    validate_spec(spec)
    entry = _entry(tokenizer)
    template = _template(entry, spec, grammar_for(spec), spec)
    return LLGMatcher(template.deep_copy(), entry.ll_tokenizer, entry.eos_token_ids)


class _ByteTokenizer:
    """A 256-token byte vocabulary (+ EOS) for checking text without a model tokenizer."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]
    special_token_ids = [256]

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


@functools.cache
def _byte_entry() -> _TokenizerEntry:
    llg = _llguidance()
    llt = llg.LLTokenizer(llg.TokenizerWrapper(_ByteTokenizer()))
    return _TokenizerEntry(ll_tokenizer=llt, eos_token_ids=frozenset({256}))


def _checker(spec: Constraint) -> Any:
    """A pristine matcher of ``spec`` over bytes (any JSON layout): callers deep-copy it."""
    return _template(_byte_entry(), spec, grammar_for(spec, for_checking=True), spec)


def text_matches(spec: Constraint, text: str) -> bool:
    """True when ``text`` is a complete output ``spec`` allows (no model tokenizer needed).

    JSON is checked with any JSON whitespace around and inside it, since the text may come
    from a model that was not constrained token by token. Raises :class:`ConstraintError`
    for an invalid spec.
    """
    validate_spec(spec)
    if isinstance(spec, JSONSchema):
        text = text.strip()
    ll = _checker(spec).deep_copy()
    return ll.consume_tokens(list(text.encode())) and ll.is_accepting()

"""The built-in constraints on llguidance: grammar → llguidance grammar, validation,
compilation.

Caches hold only values: the grammar texts and validation results (by grammar), one
llguidance tokenizer per model tokenizer, and the masks llguidance computed per state of a
regex (:mod:`._regex_masks`). Every request compiles its own matcher, so nothing a
request's lexer or parser builds (or a limit it hits) reaches another request.

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
from collections.abc import Callable
from typing import Any

import attrs

from ..errors import ConstraintError
from ._llg_matcher import LLGMatcher
from ._pyregex import to_rust_regex
from ._regex_masks import RegexMasks, regex_masks
from ._schema_split import Deferred, SchemaSplit, split_schema
from .base import Constraint, ConstraintGrammar
from .limits import ConstraintLimits

__all__ = ["JSON_DEFAULTS", "JsonPlan", "compile_spec", "error_summary", "grammar_text",
           "json_plan", "text_matches", "validate_spec"]

#: llguidance JSON options used unless the schema's ``"x-guidance"`` says otherwise.
JSON_DEFAULTS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


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


@attrs.frozen
class JsonPlan:
    """How a JSON schema is decoded: the llguidance grammar of its enforced part and the
    keywords checked on the finished value (see :mod:`aiolm.constraints._schema_split`)."""

    grammar: str
    deferred: tuple[Deferred, ...]


_ONE_OF_REFUSED = "oneOf constraints are not supported"
_COUNTS_REFUSED = "min/maxProperties only supported"


@functools.lru_cache(maxsize=1024)
def json_plan(schema_json: str) -> JsonPlan:
    """The :class:`JsonPlan` of a schema (compact JSON text), cached.

    What llguidance can enforce is left to it: a ``oneOf`` it proves disjoint, the
    ``min/maxProperties`` it supports. When it refuses those, every ``oneOf`` is decoded as
    ``anyOf`` and the property counts of objects with optional properties are dropped from
    the grammar; both are then checked after. Raises :class:`ConstraintError` for a schema
    llguidance cannot read or a format no one can check (other problems surface in
    :func:`validate_spec`).
    """
    llg = _llguidance()
    split = split_schema(schema_json)
    options = _guidance_options(split)
    coerce = bool(options.get("coerce_one_of") or options.get("lenient"))
    try:
        for _ in range(3):
            grammar = llg.LLMatcher.grammar_from_json_schema(
                split.enforced_json, defaults=JSON_DEFAULTS,
                overrides={"coerce_one_of": True} if coerce else None)
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
            if not is_error:
                break
            if _ONE_OF_REFUSED in messages[0] and split.one_of_paths and not coerce:
                coerce = True
            elif _COUNTS_REFUSED in messages[0] and not _defers_counts(split):
                split = split_schema(schema_json, property_counts=True)
            else:
                break  # validate_spec names the problem
    except ValueError as exc:
        raise ConstraintError(_describe("json_schema", str(exc))) from None
    deferred = split.deferred
    if coerce:
        deferred += tuple(Deferred("oneOf", p) for p in split.one_of_paths)
    if options.get("lenient"):  # llguidance then drops what it cannot enforce, unnamed
        deferred += (Deferred("x-guidance lenient", ""),)
    return JsonPlan(grammar=grammar, deferred=deferred)


def _defers_counts(split: SchemaSplit) -> bool:
    return any(d.keyword in ("minProperties", "maxProperties") for d in split.deferred)


def _guidance_options(split: SchemaSplit) -> dict[str, Any]:
    """The schema's own llguidance options (``"x-guidance"``): with ``coerce_one_of`` (or
    ``lenient``) a ``oneOf`` is decoded as ``anyOf``, so its exclusivity is checked after;
    with ``lenient`` the whole schema is (llguidance ignores what it cannot enforce)."""
    schema = json.loads(split.enforced_json)
    options = schema.get("x-guidance") if isinstance(schema, dict) else None
    return options if isinstance(options, dict) else {}


@functools.lru_cache(maxsize=1024)
def grammar_text(grammar: ConstraintGrammar) -> str:
    """The llguidance grammar of ``grammar`` (not yet validated). Raises
    :class:`ConstraintError` for a regex this engine cannot express or a grammar or schema
    llguidance cannot read."""
    llg = _llguidance()
    kind, source = grammar.kind, grammar.source
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(to_rust_regex(source))
    if kind == "choices":
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in source)
        return llg.LLMatcher.grammar_from_lark(f"start: {alternatives}")
    if kind == "lark":
        try:
            return llg.grammar_from("grammar", source)
        except ValueError as exc:
            raise ConstraintError(_describe("grammar", str(exc))) from None
    return json_plan(source).grammar


_NOTHING = {
    "regex": "the pattern matches no string (an empty character class like [^\\s\\S]?)",
    "json_schema": "no JSON value is valid under the schema (a $ref cycle with no other way out?)",
    "lark": "the grammar derives no sentence (a rule that only refers to itself?)",
}


def _kind(grammar: ConstraintGrammar) -> str:
    if grammar.kind == "regex":
        return f"regex {grammar.source!r}"
    return {"lark": "grammar"}.get(grammar.kind, grammar.kind)


def validate_spec(spec: Constraint) -> None:
    """Raise :class:`ConstraintError` naming the problem if llguidance cannot compile the
    grammar of ``spec`` (:meth:`~aiolm.constraints.Constraint.as_grammar`) or no output can
    satisfy it.

    Needs no tokenizer, so programs call it when they submit a ``gen``, before any token.
    Cached by grammar (only successes are cached: an exception is re-raised each time).
    """
    _validate_grammar(_grammar_of(spec))


def _grammar_of(spec: Constraint) -> ConstraintGrammar:
    grammar = spec.as_grammar()
    if grammar is None:
        raise TypeError(f"constraint: {type(spec).__name__} has no grammar; "
                        f"its own compile() builds its matcher")
    return grammar


@functools.lru_cache(maxsize=1024)
def _validate_grammar(grammar: ConstraintGrammar) -> None:
    llg = _llguidance()
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(
        grammar_text(grammar), limits=ConstraintLimits().to_llguidance())
    if is_error:
        raise ConstraintError(_describe(_kind(grammar), messages[0]))
    # A grammar can be well formed and still allow no output at all (``[^\s\S]``, a
    # ``$ref`` to itself): llguidance would only say so at the first token. One that allows
    # neither the empty output nor any first byte allows nothing (checked over bytes, once
    # per grammar: about a millisecond).
    # NOTE: this catches a constraint that cannot start; one that can start but never
    # finish (a required property that recurses forever) still fails while decoding.
    ll = _byte_matcher(grammar)
    if not ll.is_accepting():
        mask = ll.compute_bitmask()
        if ll.is_error() or not any(mask):
            raise ConstraintError(f"{_kind(grammar)}: unsatisfiable: "
                                  f"{_NOTHING.get(grammar.kind, 'no output can match it')}")


@attrs.define(eq=False)
class _TokenizerEntry:
    """One llguidance tokenizer (immutable: shared by every request on the tokenizer) and
    the masks kept per state of its regex constraints (values llguidance computed; no
    matcher state)."""

    ll_tokenizer: Any
    eos_token_ids: frozenset[int]
    regex_masks: OrderedDict[str, RegexMasks | None] = attrs.field(factory=OrderedDict)


_MAX_PATTERNS = 8  # regexes whose masks are kept, per tokenizer (at most 64 MB)


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


def error_summary(message: str) -> str:
    """llguidance's error ``message`` in one line: why, and the tokens it happened after
    (its parser state and the grammar are left out)."""
    head, _, state = message.partition("<state>")
    why = " ".join(line.strip() for line in head.strip().splitlines() if line.strip())
    for line in state.splitlines():
        if line.startswith("Tokens: "):
            tokens = line[len("Tokens: "):]
            if len(tokens) > 120:
                tokens = "..." + tokens[-117:]
            return f"{why} (after {tokens})"
    return why


def _new_matcher(ll_tokenizer: Any, grammar: ConstraintGrammar,
                 limits: ConstraintLimits) -> Any:
    """A fresh llguidance matcher of ``grammar``: its own lexer and parser, shared with no
    other request (a copy of a compiled one would share its lexer's states, and a lexer
    that hits a limit would fail every later copy)."""
    llg = _llguidance()
    ll = llg.LLMatcher(ll_tokenizer, grammar_text(grammar), log_level=0,
                       limits=limits.to_llguidance())
    if ll.is_error():
        raise ConstraintError(f"{_kind(grammar)}: {error_summary(ll.get_error())}")
    return ll


def compile_spec(spec: Constraint, tokenizer: Any, limits: ConstraintLimits | None = None, *,
                 check: Callable[[str], str | None] | None = None) -> LLGMatcher:
    """A fresh :class:`LLGMatcher` of ``spec``'s grammar for one request.

    ``tokenizer`` is the engine's :class:`aiolm.engine.tokenizer.Tokenizer` (its ``hf``
    and ``eos_token_ids`` are used) or a fast Hugging Face tokenizer. The llguidance
    tokenizer is built once per tokenizer; the grammar is compiled for each request (about
    half a millisecond, the GIL released). ``check`` (see :class:`LLGMatcher`) judges the
    finished text. Raises :class:`ConstraintError` for an invalid spec.
    """
    validate_spec(spec)
    entry = _entry(tokenizer)
    grammar = _grammar_of(spec)
    ll = _new_matcher(entry.ll_tokenizer, grammar, limits or ConstraintLimits())
    masks = _masks_of(entry, grammar.source) if grammar.kind == "regex" else None
    return LLGMatcher(ll, entry.ll_tokenizer, entry.eos_token_ids, check=check, masks=masks)


def _masks_of(entry: _TokenizerEntry, pattern: str) -> RegexMasks | None:
    """The kept masks of a regex on this tokenizer (see :mod:`._regex_masks`), LRU."""
    with _lock:
        if pattern in entry.regex_masks:
            entry.regex_masks.move_to_end(pattern)
            return entry.regex_masks[pattern]
    masks = regex_masks(pattern)
    with _lock:
        masks = entry.regex_masks.setdefault(pattern, masks)
        while len(entry.regex_masks) > _MAX_PATTERNS:
            entry.regex_masks.popitem(last=False)
    return masks


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


def _byte_matcher(grammar: ConstraintGrammar) -> Any:
    """A fresh matcher of ``grammar`` over bytes (for checks without a model tokenizer)."""
    return _new_matcher(_byte_entry().ll_tokenizer, grammar, ConstraintLimits())


def text_matches(spec: Constraint, text: str) -> bool:
    """True when llguidance's grammar of ``spec`` accepts ``text`` whole (no model
    tokenizer needed): the text check of a Lark grammar, which has no other checker.
    Raises :class:`ConstraintError` for an invalid spec."""
    validate_spec(spec)
    ll = _byte_matcher(_grammar_of(spec))
    return ll.consume_tokens(list(text.encode())) and ll.is_accepting()

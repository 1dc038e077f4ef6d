"""Tokenization through Hugging Face tokenizers, and incremental detokenization.

``Tokenizer`` wraps a ``transformers`` tokenizer loaded from a local directory or from a
GGUF file's embedded vocabulary (never from the network). ``IncrementalDetokenizer`` turns
a request's output tokens into text as they arrive without ever splitting a character:
byte-level tokenizers spread one emoji or CJK character over several tokens, and a piece
whose decoding ends in U+FFFD (an incomplete UTF-8 sequence) is held back until the
character completes. Where the tokenizer is a ``tokenizers`` one (a fast tokenizer), that
is done by ``tokenizers``' own streaming decoder (``tokenizers.decoders.DecodeStream``, the
same rule in Rust, several times faster a token); otherwise by decoding a window of tokens.

Chat content must not smuggle control tokens: a user message containing ``<|im_start|>``
would otherwise encode as the template's own marker and forge a turn. A chat rendered to text
is therefore a :class:`MarkedText` whose *literal* spans (the message content) encode any
special-token text as ordinary tokens; plain ``str`` prompts encode as they always did.
:meth:`Tokenizer.render_chat` renders OpenAI-format messages through the model's Jinja chat
template (or one given in its place) and marks each message's content in the result.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..sequences import common_prefix_length

__all__ = ["IncrementalDetokenizer", "MarkedText", "Tokenizer"]


def _import_tqdm_quietly() -> None:
    """Import ``tqdm.auto`` before ``transformers`` does, without its notebook warning.

    In a Jupyter kernel without ipywidgets, importing ``tqdm.auto`` warns "IProgress not
    found" (transformers imports it for download bars aiolm never shows), so every engine's
    first start in a notebook would print a warning that says nothing about aiolm.
    """
    import sys
    import warnings

    if "tqdm.auto" in sys.modules:
        return
    # NOTE: catch_warnings swaps the process-wide filters for the import's few milliseconds;
    # the one filter it adds matches only this message.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import tqdm.auto  # noqa: F401

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context so the first output piece decodes as it would in
# the middle of the text (SentencePiece tokenizers drop a leading space otherwise).
_CONTEXT_TOKENS = 5
# Stands for message content ``k`` while a chat is rendered to find where content lands
# (private-use characters, which no template writes or transforms).
_CONTENT_MARK = "\ue000aiolm{}\ue001"
_CONTENT_MARK_RE = re.compile("\ue000aiolm(\\d+)\ue001")


class MarkedText(str):
    """A ``str`` with *literal* spans: special-token text inside them is plain text.

    ``literal_spans`` are sorted, disjoint, non-empty ``(start, end)`` character ranges.
    :meth:`Tokenizer.encode` encodes a control token's text that overlaps a literal span as
    the ordinary tokens of that text, and everything else as it encodes a plain ``str``.
    ``+`` keeps the spans of both operands (a plain ``str`` operand adds none); every other
    ``str`` operation returns a plain ``str``.

    NOTE: a plain ``str`` encodes raw, so code between the chat renderer and the engine must
    pass the rendered text on as it is (or extend it with ``+``), never rebuild it.

    Raises ``ValueError`` for spans out of order, overlapping or outside the text.
    """

    literal_spans: tuple[tuple[int, int], ...]

    def __new__(cls, text: str = "", literal_spans: Iterable[tuple[int, int]] = ()) -> MarkedText:
        self = super().__new__(cls, text)
        spans: list[tuple[int, int]] = []
        end = 0
        for start, stop in literal_spans:
            if not end <= start <= stop <= len(text):
                raise ValueError(
                    f"literal_spans: ({start}, {stop}) is out of order or outside a text of "
                    f"{len(text)} characters"
                )
            if start == stop:
                continue
            if spans and spans[-1][1] == start:  # adjacent: one span
                start = spans.pop()[0]
            spans.append((start, stop))
            end = stop
        self.literal_spans = tuple(spans)
        return self

    def __add__(self, other: str) -> MarkedText:
        if not isinstance(other, str):
            return NotImplemented
        return MarkedText(str.__add__(self, other),
                          (*self.literal_spans, *_shifted(other, len(self))))

    def __radd__(self, other: str) -> MarkedText:
        if not isinstance(other, str):
            return NotImplemented
        return MarkedText(str.__add__(other, self), _shifted(self, len(other)))

    def __reduce__(self) -> tuple[Any, ...]:
        return MarkedText, (str(self), self.literal_spans)


def _shifted(text: str, by: int) -> list[tuple[int, int]]:
    spans = text.literal_spans if isinstance(text, MarkedText) else ()
    return [(start + by, stop + by) for start, stop in spans]


#: The characters at the end of a prompt whose pre-tokens :meth:`Tokenizer.encode_continuations`
#: reads to find the last one.
_SPLIT_WINDOW = 512


class Tokenizer:
    """A Hugging Face tokenizer with the engine's conveniences.

    ``eos_token_ids``: every token that ends generation (the tokenizer's EOS plus, for a
    HF directory, the ids in ``generation_config.json``).
    """

    def __init__(self, hf: Any, *, eos_token_ids: Iterable[int] = ()) -> None:
        self.hf = hf
        ids = [i for i in eos_token_ids if i is not None]
        if hf.eos_token_id is not None:
            ids.insert(0, hf.eos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))
        self._specials: dict[int, str] | None = None  # control token id -> its text

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load from a local HF directory or a ``.gguf`` file (offline).

        Raises FileNotFoundError naming a missing path.
        """
        _import_tqdm_quietly()
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"tokenizer: no such file or directory: {str(path)!r}")
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(f"tokenizer: {str(path)!r} is neither a directory nor a .gguf file")
            # Not AutoTokenizer: it parses the whole file again (every tensor's header and
            # the metadata, ~3 s here) only to pick a class; a GGUF vocabulary is converted
            # into the fast tokenizer whatever the class, reading just its token arrays.
            hf = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         local_files_only=True)
            return cls(hf)
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return cls(hf, eos_token_ids=_generation_eos_ids(path))

    @property
    def vocab_size(self) -> int:
        """Number of tokens including added special tokens."""
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (its vocabulary string's length, an
        upper bound): a text of ``n`` characters has at least ``n / max_token_chars``
        tokens, which refuses an over-long prompt before encoding it."""
        try:
            tokens = self.hf.convert_ids_to_tokens(list(range(len(self.hf))))
        except (AttributeError, TypeError):  # no vocabulary to read: no early refusal
            return 2**62
        return max((len(t) for t in tokens if isinstance(t, str)), default=1)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``.

        No BOS is added by default: prompts rendered from a chat template already carry the
        template's BOS text, and programs re-encode text that already starts with one.
        Special-token text (``<|im_start|>``) in a plain ``str`` encodes as the control
        token; inside a :class:`MarkedText`'s literal spans it encodes as ordinary tokens.
        """
        spans = text.literal_spans if isinstance(text, MarkedText) else ()
        if not spans:
            return list(self.hf.encode(str(text), add_special_tokens=add_special_tokens))
        if not getattr(self.hf, "is_fast", False):
            return self._encode_runs(str(text), spans, add_special_tokens)
        return self._encode_escaped(str(text), spans, add_special_tokens)

    def encode_continuations(self, text: str, continuations: Sequence[str]
                             ) -> tuple[list[int], list[list[int]]]:
        """``encode(text)`` and ``encode(text + c)`` for each of ``continuations`` (what
        ``select`` scores), without encoding ``text`` again for every choice.

        A choice can change how the end of ``text`` tokenizes ("world" + "s"), so each is
        encoded joined to the tail of ``text`` from its last pre-token on (where the
        tokenizer's regex split starts the last word), behind the ids of the rest. That
        holds for a fast tokenizer without a normalizer whose tokens start there, with no
        literal span (:class:`MarkedText`) in the tail; it is checked against the whole
        joined encoding of the first choice, and any other case (a normalizer, a literal
        tail, a mismatch) encodes every choice whole, as before. So ``text`` is encoded
        twice (alone and with the first choice) rather than once per choice, and the results
        are exactly the whole encodings'.
        """
        split = self._tail_split(text) if continuations else None
        if split is None:
            return self.encode(text), [self.encode(text + c) for c in continuations]
        ids, head, tail = split
        first = self.encode(text + continuations[0])
        if head + self.encode(tail + continuations[0]) != first:
            return ids, [first, *(self.encode(text + c) for c in continuations[1:])]
        return ids, [first, *(head + self.encode(tail + c) for c in continuations[1:])]

    def _tail_split(self, text: str) -> tuple[list[int], list[int], str] | None:
        """``(ids of text, ids before its last pre-token, the text from there)``, or None
        where that split is not known to be safe (see :meth:`encode_continuations`)."""
        spans = text.literal_spans if isinstance(text, MarkedText) else ()
        backend = getattr(self.hf, "backend_tokenizer", None)
        if (not getattr(self.hf, "is_fast", False) or backend is None
                or backend.normalizer is not None or backend.pre_tokenizer is None):
            return None
        # The last pre-token from the text's end alone (a regex split is local: a window
        # holding a few whole pieces ends in the same ones), the whole text when short.
        window = max(0, len(text) - _SPLIT_WINDOW)
        pieces = backend.pre_tokenizer.pre_tokenize_str(str(text)[window:])
        if len(pieces) < (3 if window else 2):
            return None
        cut = window + pieces[-1][1][0]
        if spans and spans[-1][1] > cut:   # the tail must hold no literal text
            return None
        enc = self.hf(str(text), add_special_tokens=False, return_offsets_mapping=True)
        plain: list[int] = list(enc["input_ids"])
        offsets = enc["offset_mapping"]
        at = bisect.bisect_left([start for start, _ in offsets], cut)
        if at == 0 or at == len(plain) or offsets[at][0] != cut or offsets[at - 1][1] > cut:
            return None
        # A chat prompt's literal spans (its messages) lie before the tail: the tail's
        # tokens are the plain encoding's, the rest the escaped encoding's.
        ids = self._encode_escaped(str(text), spans, False, enc=enc) if spans else plain
        keep = len(ids) - (len(plain) - at)
        if ids[keep:] != plain[at:]:
            return None
        return ids, ids[:keep], str(text)[cut:]

    def _encode_escaped(self, text: str, spans: Sequence[tuple[int, int]],
                        add_special_tokens: bool, *, enc: Any = None) -> list[int]:
        # Encode the text whole, as a plain str, then replace each control token whose text
        # overlaps a literal span by the ordinary tokens of that text. Every other token is
        # kept, so benign text encodes exactly as a plain str does and a conversation's
        # tokens stay a prefix of the next turn's (the prefix cache keeps hitting). ``enc``:
        # that plain encoding (with offsets), when the caller has it already.
        if enc is None:
            enc = self.hf(text, add_special_tokens=add_special_tokens,
                          return_offsets_mapping=True)
        ids: list[int] = list(enc["input_ids"])
        offsets = enc["offset_mapping"]
        specials = self._special_tokens()
        starts = [start for start, _ in spans]
        forged = [i for i, token in enumerate(ids) if token in specials
                  and _in_literal(text, specials[token], offsets[i], spans, starts)]
        if not forged:
            return ids
        out: list[int] = []
        pos = 0
        for i in forged:
            a, b = offsets[i]
            out += ids[pos:i]
            out += self.hf.encode(text[a:b], add_special_tokens=False, split_special_tokens=True)
            pos = i + 1
        out += ids[pos:]
        return out

    def _encode_runs(self, text: str, spans: Sequence[tuple[int, int]],
                     add_special_tokens: bool) -> list[int]:
        # Without offsets (a Python tokenizer), each literal span encodes on its own with
        # special-token parsing off; the text between spans encodes as usual.
        out: list[int] = []
        pos = 0
        for start, stop in spans:
            if start > pos:
                out.extend(self.hf.encode(text[pos:start], add_special_tokens=False))
            out.extend(self.hf.encode(text[start:stop], add_special_tokens=False,
                                      split_special_tokens=True))
            pos = stop
        if pos < len(text):
            out.extend(self.hf.encode(text[pos:], add_special_tokens=False))
        if add_special_tokens:
            out = list(self.hf.build_inputs_with_special_tokens(out))
        return out

    def _special_tokens(self) -> dict[int, str]:
        """The control tokens (added tokens marked special), by id."""
        if self._specials is None:
            self._specials = {i: t.content for i, t in self.hf.added_tokens_decoder.items()
                              if t.special}
        return self._specials

    def special_token_text(self, token_id: int) -> str | None:
        """The text of control token ``token_id`` (an added token marked special), or None
        when the id is no such token."""
        return self._special_tokens().get(token_id)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (special tokens left out unless asked)."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def decode_each(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> list[str]:
        """Each token's own text (``decode([t])`` for every ``t`` of ``ids``), in one call."""
        return self.hf.batch_decode([[t] for t in ids], skip_special_tokens=skip_special_tokens,
                                    clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            *, chat_template: str | None = None, **kwargs: Any) -> str:
        """The conversation rendered by the model's own chat template (or the Jinja source
        ``chat_template`` in its place), as text.

        Raises ValueError when there is no template; Jinja's errors pass through.
        """
        if chat_template is None and not self.has_chat_template:
            raise ValueError("messages: this tokenizer has no chat template")
        return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           tokenize=False, chat_template=chat_template, **kwargs)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    add_generation_prompt: bool = True, chat_template: str | None = None,
                    **template_kwargs: Any) -> MarkedText:
        """OpenAI-format ``messages`` (and ``tools``) rendered by the chat template, with each
        message's text content marked literal (see :class:`MarkedText`).

        ``chat_template`` (Jinja source) replaces the tokenizer's own. Content is located by
        rendering the chat again with a placeholder for each text; when the template
        transforms content (so the placeholders do not give back the same text), each
        content is searched for in the rendered text, in order, and one not found verbatim
        is not marked. Raises ``TypeError`` for a message that is not a mapping,
        ``ValueError`` when there is no template or the template fails (a Jinja syntax
        error, a message it rejects).
        """
        import jinja2

        for m in messages:
            if not isinstance(m, Mapping):
                raise TypeError(f"messages: expected dicts, got {type(m).__name__}")

        def render(chat: list[dict[str, Any]]) -> str:
            return self.apply_chat_template(
                chat, add_generation_prompt, chat_template=chat_template,
                tools=[dict(t) for t in tools] if tools else None, **template_kwargs)

        try:
            text = render([dict(m) for m in messages])
        except (jinja2.TemplateError, TypeError) as exc:
            raise chat_template_error(exc) from exc
        probe, contents = _content_placeholders(messages)
        spans = None
        if contents:
            try:
                spans = _placed_spans(render(probe), contents, text)
            except Exception:  # the template refuses a placeholder: search instead
                spans = None
        if spans is None:
            spans = _searched_spans(text, contents)
        return MarkedText(text, spans)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def bos_token(self) -> str | None:
        """The BOS token's text (which a chat template may write in front of a chat)."""
        return getattr(self.hf, "bos_token", None)

    @property
    def chat_template_source(self) -> str | None:
        """The tokenizer's own Jinja chat template (its default one, where it has several)."""
        template = getattr(self.hf, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        return template or None

    def detokenizer(self, prompt_ids: Sequence[int] = (), *,
                    skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one request whose prompt is ``prompt_ids``."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, context: Sequence[int], *, skip_special_tokens: bool) -> Any:
        """``tokenizers``' streaming decoder after ``context`` (a ``DecodeStream``), or None
        where there is none: a tokenizer that is not a ``tokenizers`` one, a version of
        ``tokenizers`` without it, or a context whose text ends in an unfinished character
        (which the first output token could complete)."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:
            return None
        try:
            from tokenizers.decoders import DecodeStream
        except ImportError:
            return None
        if self.decode(context, skip_special_tokens=skip_special_tokens).endswith(_REPLACEMENT):
            return None
        return DecodeStream(ids=list(context), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Streams a request's output text token by token, never splitting a character.

    ``feed(ids)`` returns the text those tokens complete ("" while a character is still
    incomplete); ``flush()`` returns whatever is held back (at the end of the request).
    The concatenation of every return value equals ``tokenizer.decode(output_ids)``.
    Mutates only its own state; raises nothing of its own.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), *,
                 skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        # Text of ids[prefix:read] was already emitted; ids[read:] not yet.
        self._prefix = 0
        self._read = len(self._ids)
        # tokenizers' streaming decoder, while it is used (see Tokenizer.decode_stream).
        self._stream = tokenizer.decode_stream(self._ids, skip_special_tokens=skip_special_tokens)
        self._backend = tokenizer.hf.backend_tokenizer if self._stream is not None else None

    def feed(self, ids: Iterable[int]) -> str:
        """Append output tokens; return the newly completed text."""
        if self._stream is None:
            self._ids.extend(ids)
            return self._emit(final=False)
        pieces = []
        for token in ids:
            self._ids.append(token)
            try:
                piece = self._stream.step(self._backend, token)
            except Exception:
                # Its rule failed (a text that does not extend the text before it): decode
                # windows from here on, from what was emitted so far.
                self._stream = None
                pieces.append(self._emit(final=False))
                continue
            if piece is not None:
                pieces.append(piece)
                self._prefix, self._read = self._read, len(self._ids)
        return "".join(pieces)

    def flush(self) -> str:
        """Return any held-back text (an incomplete character decodes as U+FFFD)."""
        text = self._emit(final=True)
        if text:
            self._stream = None  # it still holds the flushed tokens: decode windows after
        return text

    def _emit(self, *, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        window = self._ids[self._prefix:]
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(window)
        if not final and (len(text) <= len(done) or text.endswith(_REPLACEMENT)):
            return ""
        new = text[len(done):] if text.startswith(done) else text[common_prefix_length(done, text):]
        self._prefix, self._read = self._read, len(self._ids)
        return new

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""


def chat_template_error(exc: Exception) -> ValueError:
    """A chat template's failure (Jinja's error, or a type error inside the template) as the
    ``ValueError`` callers see, naming the template and, for a syntax error, the line."""
    import jinja2

    if isinstance(exc, jinja2.TemplateSyntaxError):
        return ValueError(f"chat_template: syntax error on line {exc.lineno}: {exc.message}")
    return ValueError(f"chat_template: rendering failed: {type(exc).__name__}: {exc}")


def _content_placeholders(
        messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """``messages`` with each non-empty text content (a string, or a text part's text)
    replaced by a placeholder, and those texts in placeholder order."""
    contents: list[str] = []

    def placeholder(text: str) -> str:
        contents.append(text)
        return _CONTENT_MARK.format(len(contents) - 1)

    probe: list[dict[str, Any]] = []
    for m in messages:
        message = dict(m)
        content = message.get("content")
        if isinstance(content, str) and content:
            message["content"] = placeholder(content)
        elif isinstance(content, list):
            message["content"] = [
                {**part, "text": placeholder(part["text"])}
                if isinstance(part, Mapping) and isinstance(part.get("text"), str) and part["text"]
                else part
                for part in content]
        probe.append(message)
    return probe, contents


def _placed_spans(probe: str, contents: Sequence[str], text: str) -> list[tuple[int, int]] | None:
    """The spans of ``contents`` in ``text``, read off the placeholders' places in ``probe``
    (the same chat rendered with placeholders); ``None`` when putting the contents back in
    place of the placeholders does not give ``text``."""
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = length = 0
    for match in _CONTENT_MARK_RE.finditer(probe):
        k = int(match[1])
        if k >= len(contents):
            return None
        pieces += [probe[pos:match.start()], contents[k]]
        length += match.start() - pos
        spans.append((length, length + len(contents[k])))
        length += len(contents[k])
        pos = match.end()
    pieces.append(probe[pos:])
    return spans if "".join(pieces) == text else None


def _searched_spans(text: str, contents: Sequence[str]) -> list[tuple[int, int]]:
    """Each of ``contents`` found in ``text`` searching forward, in order (one not found is
    skipped)."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for content in contents:
        at = text.find(content, pos)
        if at >= 0:
            spans.append((at, at + len(content)))
            pos = at + len(content)
    return spans


def _in_literal(text: str, content: str, offset: tuple[int, int],
                spans: Sequence[tuple[int, int]], starts: Sequence[int]) -> bool:
    """Whether a control token's text at ``offset`` overlaps a literal span."""
    a, b = offset
    # NOTE: a token that strips whitespace around it has offsets that include the
    # whitespace; only the token's own text decides whether it was forged.
    at = text.find(content, a, b)
    lo, hi = (at, at + len(content)) if at >= 0 else (a, b)
    k = bisect.bisect_right(starts, hi - 1) - 1  # the last span starting before ``hi``
    return lo < hi and k >= 0 and spans[k][1] > lo


def _generation_eos_ids(directory: Path) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = directory / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token_id")
            ids.extend([eos] if isinstance(eos, int) else eos or [])
    return ids

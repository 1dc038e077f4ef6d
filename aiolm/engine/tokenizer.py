"""Tokenization through Hugging Face tokenizers, and incremental detokenization.

``Tokenizer`` wraps a ``transformers`` tokenizer loaded from a local directory or from a
GGUF file's embedded vocabulary (never from the network). ``IncrementalDetokenizer`` turns
a request's output tokens into text as they arrive without ever splitting a character:
byte-level tokenizers spread one emoji or CJK character over several tokens, and a piece
whose decoding ends in U+FFFD (an incomplete UTF-8 sequence) is held back until the
character completes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["IncrementalDetokenizer", "Tokenizer"]

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context so the first output piece decodes as it would in
# the middle of the text (SentencePiece tokenizers drop a leading space otherwise).
_CONTEXT_TOKENS = 5


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

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load from a local HF directory or a ``.gguf`` file (offline).

        Raises FileNotFoundError naming a missing path.
        """
        from transformers import AutoTokenizer

        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"tokenizer: no such file or directory: {str(path)!r}")
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(f"tokenizer: {str(path)!r} is neither a directory nor a .gguf file")
            hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
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

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``.

        No BOS is added by default: prompts rendered from a chat template already carry the
        template's BOS text, and programs re-encode text that already starts with one.
        """
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (special tokens left out unless asked)."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The conversation rendered by the model's own chat template, as text.

        Raises ValueError when the tokenizer has no chat template.
        """
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("messages: this tokenizer has no chat template")
        return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           tokenize=False, **kwargs)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def detokenizer(self, prompt_ids: Sequence[int] = (), *,
                    skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one request whose prompt is ``prompt_ids``."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens=skip_special_tokens)


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

    def feed(self, ids: Iterable[int]) -> str:
        """Append output tokens; return the newly completed text."""
        self._ids.extend(ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Return any held-back text (an incomplete character decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        window = self._ids[self._prefix:]
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(window)
        if not final and (len(text) <= len(done) or text.endswith(_REPLACEMENT)):
            return ""
        new = text[len(done):] if text.startswith(done) else text[_common_prefix(done, text):]
        self._prefix, self._read = self._read, len(self._ids)
        return new

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _generation_eos_ids(directory: Path) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = directory / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token_id")
            ids.extend([eos] if isinstance(eos, int) else eos or [])
    return ids

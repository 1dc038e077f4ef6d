"""Building OpenAI response bodies and stream chunks from aiolm ``Chunk``\\ s."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal

import attrs

from ..backends.base import Chunk, TokenLogprob, Usage

__all__ = ["Choice", "Reply"]

# OpenAI writes a very unlikely token's logprob as a large negative number, never -inf.
_FLOOR = -9999.0


def _lp(value: float) -> float:
    return value if math.isfinite(value) else _FLOOR


@attrs.define(eq=False)
class Choice:
    """What one choice has produced so far."""

    index: int
    prompt_index: int = 0
    offset: int = 0            # completions: text_offset of the first generated character
    text: list[str] = attrs.field(factory=list)
    token_ids: list[int] = attrs.field(factory=list)
    logprobs: list[TokenLogprob] = attrs.field(factory=list)
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    usage: Usage | None = None
    emitted_chars: int = 0     # streaming: characters already sent (for text_offset)

    def add(self, chunk: Chunk) -> None:
        self.text.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.matched_stop = chunk.matched_stop
            self.usage = chunk.usage


@attrs.define(eq=False)
class Reply:
    """One response (all its choices) in the OpenAI format of ``kind``."""

    kind: Literal["completion", "chat"]
    model: str
    logprobs: bool
    token_ids: bool = False
    id: str = attrs.field(init=False)
    created: int = attrs.field(factory=lambda: int(time.time()), init=False)

    def __attrs_post_init__(self) -> None:
        prefix = "cmpl" if self.kind == "completion" else "chatcmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"

    def _head(self, chunk: bool) -> dict[str, Any]:
        obj = {"completion": "text_completion", "chat": "chat.completion"}[self.kind]
        if chunk and self.kind == "chat":
            obj = "chat.completion.chunk"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ------------------------------------------------------------------ whole responses

    def body(self, choices: list[Choice]) -> dict[str, Any]:
        """The non-streamed response."""
        out = self._head(chunk=False)
        out["choices"] = [self._whole_choice(c) for c in choices]
        out["usage"] = usage_body(choices)
        return out

    def _whole_choice(self, c: Choice) -> dict[str, Any]:
        text = "".join(c.text)
        lps = self._logprobs(c.logprobs, c.offset) if self.logprobs else None
        item: dict[str, Any] = {"index": c.index, "logprobs": lps, "finish_reason": c.finish_reason,
                                "matched_stop": c.matched_stop}
        if self.kind == "completion":
            item["text"] = text
        else:
            item["message"] = {"role": "assistant", "content": text}
        if self.token_ids:
            item["token_ids"] = list(c.token_ids)
        return item

    # ------------------------------------------------------------------ stream chunks

    def first_chunk(self, index: int) -> dict[str, Any] | None:
        """A chat stream opens each choice with the assistant role (completions: nothing)."""
        if self.kind != "chat":
            return None
        out = self._head(chunk=True)
        out["choices"] = [{"index": index, "delta": {"role": "assistant", "content": ""},
                           "logprobs": None, "finish_reason": None}]
        return out

    def chunk(self, c: Choice, piece: Chunk) -> dict[str, Any]:
        """The stream chunk carrying ``piece`` of choice ``c``."""
        out = self._head(chunk=True)
        offset = c.offset + c.emitted_chars
        c.emitted_chars += len(piece.text)
        lps = self._logprobs(list(piece.logprobs), offset) if self.logprobs and piece.logprobs else None
        item: dict[str, Any] = {"index": c.index, "logprobs": lps, "finish_reason": piece.finish_reason}
        if piece.finish_reason is not None:
            item["matched_stop"] = piece.matched_stop
        if self.kind == "completion":
            item["text"] = piece.text
        else:
            item["delta"] = {"content": piece.text} if piece.text else {}
        if self.token_ids:
            item["token_ids"] = list(piece.token_ids)
        out["choices"] = [item]
        return out

    def usage_chunk(self, choices: list[Choice]) -> dict[str, Any]:
        """The last chunk when the client asked for ``stream_options.include_usage``."""
        out = self._head(chunk=True)
        out["choices"] = []
        out["usage"] = usage_body(choices)
        return out

    # ------------------------------------------------------------------ logprobs

    def _logprobs(self, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
        if self.kind == "chat":
            return {"content": [
                {"token": lp.token, "logprob": _lp(lp.logprob), "bytes": list(lp.token.encode()),
                 "top_logprobs": [{"token": t, "logprob": _lp(v), "bytes": list(t.encode())}
                                  for _, t, v in lp.top]}
                for lp in lps
            ]}
        offsets, pos = [], offset
        for lp in lps:
            offsets.append(pos)
            pos += len(lp.token)
        return {
            "tokens": [lp.token for lp in lps],
            "token_logprobs": [_lp(lp.logprob) for lp in lps],
            "top_logprobs": [{t: _lp(v) for _, t, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }


def usage_body(choices: list[Choice]) -> dict[str, Any]:
    """Usage of a request: each prompt once (its ``n`` choices share it), every completion."""
    prompt = cached = completion = 0
    seen: set[int] = set()
    for c in choices:
        u = c.usage or Usage()
        completion += u.completion_tokens
        if c.prompt_index not in seen:
            seen.add(c.prompt_index)
            prompt += u.prompt_tokens
            cached += u.cached_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}

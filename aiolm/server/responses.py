"""Building OpenAI response bodies and stream chunks from aiolm ``Chunk``\\ s."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import attrs

from ..backends.base import Chunk, TokenLogprob, Usage
from ..tools.spec import ToolCallDelta, new_call_id

__all__ = ["Choice", "Reply", "best_of", "usage_body"]

# OpenAI writes a very unlikely token's logprob as a large negative number, never -inf.
_FLOOR = -9999.0


def _lp(value: float) -> float:
    return value if math.isfinite(value) else _FLOOR


@attrs.define(eq=False)
class Choice:
    """What one choice has produced so far.

    ``echo``: completions with ``echo``: the prompt's text, which goes before the answer
    (in the first stream chunk); ``prompt_logprobs`` its tokens' logprobs when asked.
    """

    index: int
    prompt_index: int = 0
    offset: int = 0            # completions: text_offset of the first generated character
    echo: str = ""
    text: list[str] = attrs.field(factory=list)
    reasoning: list[str] = attrs.field(factory=list)
    token_ids: list[int] = attrs.field(factory=list)
    logprobs: list[TokenLogprob] = attrs.field(factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    call_deltas: list[ToolCallDelta] = attrs.field(factory=list)
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    usage: Usage | None = None
    emitted_chars: int = 0     # streaming: characters already sent (for text_offset)
    echoed: bool = False       # streaming: the echo went out
    _call_indices: set[int] = attrs.field(factory=set, init=False)

    def add(self, chunk: Chunk) -> Chunk:
        """Take ``chunk`` in; returns it with each tool call's id filled in (the id a
        stream sends and the whole answer shows must be one)."""
        if chunk.tool_calls:
            chunk = attrs.evolve(chunk, tool_calls=tuple(self._with_id(d) for d in chunk.tool_calls))
        self.text.append(chunk.text)
        self.reasoning.append(chunk.reasoning)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        self.call_deltas.extend(chunk.tool_calls)
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = chunk.prompt_logprobs
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.matched_stop = chunk.matched_stop
            self.usage = chunk.usage
        return chunk

    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls made, as OpenAI's ``message.tool_calls``: the arguments are the text
        the stream sent (a call cut off by ``max_tokens`` keeps its partial text)."""
        calls: dict[int, dict[str, Any]] = {}
        for d in self.call_deltas:
            call = calls.setdefault(d.index, {"id": d.id, "type": "function",
                                              "function": {"name": d.name or "", "arguments": ""}})
            call["function"]["arguments"] += d.arguments
        return [calls[i] for i in sorted(calls)]

    def _with_id(self, delta: ToolCallDelta) -> ToolCallDelta:
        first = delta.index not in self._call_indices
        self._call_indices.add(delta.index)
        if first and delta.id is None:
            return attrs.evolve(delta, id=new_call_id())
        return delta

    @property
    def mean_logprob(self) -> float:
        """The mean logprob of the answer's tokens (``-inf`` for an empty answer)."""
        if not self.logprobs:
            return -math.inf
        return sum(lp.logprob for lp in self.logprobs) / len(self.logprobs)


def best_of(choices: Sequence[Choice], n: int) -> list[Choice]:
    """The ``n`` choices of each prompt with the highest mean token logprob, best first,
    re-indexed from 0 (``choices`` in prompt order, as many per prompt)."""
    by_prompt: dict[int, list[Choice]] = {}
    for c in choices:
        by_prompt.setdefault(c.prompt_index, []).append(c)
    out: list[Choice] = []
    for prompt_index in sorted(by_prompt):
        ranked = sorted(by_prompt[prompt_index], key=lambda c: c.mean_logprob, reverse=True)
        out.extend(ranked[:n])
    for i, c in enumerate(out):
        c.index = i
    return out


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

    def body(self, choices: list[Choice], counted: list[Choice] | None = None) -> dict[str, Any]:
        """The non-streamed response; ``counted``: the choices its usage counts (all the
        ``best_of`` candidates; default ``choices``)."""
        out = self._head(chunk=False)
        out["choices"] = [self._whole_choice(c) for c in choices]
        out["usage"] = usage_body(counted if counted is not None else choices)
        return out

    def _whole_choice(self, c: Choice) -> dict[str, Any]:
        text = "".join(c.text)
        lps = None
        if self.logprobs:
            lps = self._logprobs(c.logprobs, c.offset, echo=c.echo, prompt=c.prompt_logprobs)
        item: dict[str, Any] = {"index": c.index, "logprobs": lps, "finish_reason": c.finish_reason,
                                "matched_stop": c.matched_stop}
        if self.kind == "completion":
            item["text"] = c.echo + text
        else:
            calls = c.tool_calls()
            message: dict[str, Any] = {"role": "assistant",
                                       "content": None if calls and not text else text}
            reasoning = "".join(c.reasoning)
            if reasoning:
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = calls
            item["message"] = message
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

    def chunk(self, c: Choice, piece: Chunk) -> dict[str, Any] | None:
        """The stream chunk carrying ``piece`` of choice ``c`` (the echoed prompt first),
        or None when ``piece`` carries nothing a client sees."""
        lead = "" if c.echoed else c.echo
        prompt = None if c.echoed else c.prompt_logprobs
        c.echoed = True
        if not (lead or prompt or piece.text or piece.reasoning or piece.tool_calls
                or piece.token_ids or piece.logprobs or piece.finish_reason is not None):
            return None
        out = self._head(chunk=True)
        offset = c.offset + c.emitted_chars
        c.emitted_chars += len(piece.text)
        lps = None
        if self.logprobs and (piece.logprobs or prompt):
            lps = self._logprobs(list(piece.logprobs), offset, echo=lead, prompt=prompt)
        item: dict[str, Any] = {"index": c.index, "logprobs": lps, "finish_reason": piece.finish_reason}
        if piece.finish_reason is not None:
            item["matched_stop"] = piece.matched_stop
        if self.kind == "completion":
            item["text"] = lead + piece.text
        else:
            delta: dict[str, Any] = {}
            if piece.reasoning:
                delta["reasoning_content"] = piece.reasoning
            if piece.text:
                delta["content"] = piece.text
            if piece.tool_calls:
                delta["tool_calls"] = _call_deltas(piece.tool_calls)
            item["delta"] = delta
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

    def _logprobs(self, lps: list[TokenLogprob], offset: int, *, echo: str = "",
                  prompt: tuple[TokenLogprob | None, ...] | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            return {"content": [
                {"token": lp.token, "logprob": _lp(lp.logprob), "bytes": list(lp.token.encode()),
                 "top_logprobs": [{"token": t, "logprob": _lp(v), "bytes": list(t.encode())}
                                  for _, t, v in lp.top]}
                for lp in lps
            ]}
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        if prompt:
            # OpenAI's echo: the prompt's tokens first, from offset 0; the first token has
            # no logprob (nothing comes before it).
            rest = "".join(lp.token for lp in prompt if lp is not None)
            first = echo[: len(echo) - len(rest)] if echo.endswith(rest) else ""
            pos = 0
            for lp in prompt:
                offsets.append(pos)
                if lp is None:
                    tokens.append(first)
                    values.append(None)
                    tops.append(None)
                    pos += len(first)
                else:
                    tokens.append(lp.token)
                    values.append(_lp(lp.logprob))
                    tops.append({t: _lp(v) for _, t, v in lp.top})
                    pos += len(lp.token)
        pos = offset
        for lp in lps:
            offsets.append(pos)
            tokens.append(lp.token)
            values.append(_lp(lp.logprob))
            tops.append({t: _lp(v) for _, t, v in lp.top})
            pos += len(lp.token)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}


def _call_deltas(deltas: Sequence[ToolCallDelta]) -> list[dict[str, Any]]:
    """Streamed tool-call pieces as OpenAI sends them: a call's id, type and name in its
    first piece, argument fragments after; pieces of one call in a row become one."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        if out and out[-1]["index"] == d.index and d.id is None and d.name is None:
            out[-1]["function"]["arguments"] += d.arguments
            continue
        item: dict[str, Any] = {"index": d.index}
        if d.id is not None:
            item["id"] = d.id
            item["type"] = "function"
        item["function"] = {"arguments": d.arguments} if d.name is None else \
            {"name": d.name, "arguments": d.arguments}
        out.append(item)
    return out


def usage_body(choices: Sequence[Choice]) -> dict[str, Any]:
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

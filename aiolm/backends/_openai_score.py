"""``select`` on the OpenAI backend, three ways.

- ``by_route``: aiolm's server scores the choices on its backend (``POST /v1/aiolm/score``),
  exactly as the in-process engine would, for every method.
- ``by_echo``: a completion API echoes each ``prefix + choice`` with its logprobs
  (``echo=True, max_tokens=0, logprobs=1``); the choice's tokens are those after the prefix.
- ``by_enum``: a chat API answers in a response format whose only valid values are the
  choices (no logprobs: the method cannot apply).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..chat import Message, messages_to_openai
from ..errors import UnsupportedFeature
from ._openai_errors import MalformedResponse
from ._openai_wire import choice_schema, parse_choice_json, read_usage, the_choice
from .base import ScoreResult, Usage, choose_by_method

if TYPE_CHECKING:
    from .openai import OpenAI

__all__ = ["by_echo", "by_enum", "by_route"]


async def by_route(backend: OpenAI, prompt: str | None, messages: tuple[Message, ...] | None,
                   choices: tuple[str, ...], method: str) -> ScoreResult:
    """Score on aiolm's server (its ``/v1/aiolm/score`` extension route)."""
    body: dict[str, Any] = {"model": backend.model_name, "continuations": list(choices),
                            "method": method}
    if messages is not None:
        body["messages"] = messages_to_openai(messages)
    else:
        body["prompt"] = prompt
    data = await backend.call(lambda: backend.client.post("/aiolm/score", cast_to=object, body=body))
    def lp(value: Any) -> float:  # the server sends an impossible choice's -inf as null
        return -math.inf if value is None else float(value)

    try:
        usage = data.get("usage") or {}
        unconditional = data.get("unconditional_logprobs")
        result = ScoreResult(
            index=int(data["index"]),
            normalized_logprobs=tuple(lp(x) for x in data["normalized_logprobs"]),
            token_logprobs=tuple(tuple(lp(x) for x in row) for row in data["token_logprobs"]),
            unconditional_logprobs=(None if unconditional is None
                                    else tuple(tuple(lp(x) for x in row) for row in unconditional)),
            usage=Usage(prompt_tokens=int(usage.get("prompt_tokens", 0)),
                        completion_tokens=int(usage.get("completion_tokens", 0)),
                        cached_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise MalformedResponse(f"the server's score answer is malformed: {exc}") from exc
    backend.record_usage(result.usage)
    return result


async def by_echo(backend: OpenAI, prompt: str, choices: tuple[str, ...], method: str) -> ScoreResult:
    """Score with a completion API's echoed prompt logprobs."""
    if method == "unconditional_normalized":
        raise UnsupportedFeature(
            "select(method='unconditional_normalized') needs logprobs without the prompt, which "
            "the OpenAI completions API does not give; use aiolm serve or aiolm.Engine"
        )
    response = await backend.call(lambda: backend.client.completions.create(
        model=backend.model_name, prompt=[prompt + c for c in choices], echo=True, max_tokens=0,
        logprobs=1, temperature=0,
    ))
    usage = read_usage(getattr(response, "usage", None)) or Usage()
    backend.record_usage(usage)
    rows = sorted(getattr(response, "choices", None) or (), key=lambda c: c.index)
    if len(rows) != len(choices):
        raise MalformedResponse(f"echo scoring: {len(rows)} answers for {len(choices)} choices")
    token_lps: list[tuple[float, ...]] = []
    greedy: list[int] = []
    for row in rows:
        lps, matches = _continuation(row.logprobs, len(prompt))
        token_lps.append(lps)
        greedy.append(matches)
    index, normalized = choose_by_method(method, token_lps, greedy_matches=greedy)
    return ScoreResult(index=index, normalized_logprobs=normalized, token_logprobs=tuple(token_lps),
                       usage=usage)


def _continuation(logprobs: Any, start: int) -> tuple[tuple[float, ...], int]:
    """Logprobs of the tokens that end after ``start``, and how many lead greedily."""
    tokens = getattr(logprobs, "tokens", None)
    offsets = getattr(logprobs, "text_offset", None)
    values = getattr(logprobs, "token_logprobs", None)
    if not tokens or offsets is None or values is None:
        raise MalformedResponse("echo scoring: the API returned no prompt logprobs")
    tops = getattr(logprobs, "top_logprobs", None) or [None] * len(tokens)
    lps: list[float] = []
    matches, leading = 0, True
    for tok, off, lp, top in zip(tokens, offsets, values, tops, strict=False):
        if off + len(tok) <= start:
            continue
        lps.append(float(lp) if lp is not None else -math.inf)
        if leading and top:
            leading = max(top.items(), key=lambda kv: kv[1])[0] == tok
            matches += leading
    return tuple(lps), matches


async def by_enum(backend: OpenAI, messages: tuple[Message, ...], choices: tuple[str, ...]) -> ScoreResult:
    """Ask a chat model to answer with one of ``choices`` (a strict enum response format)."""
    longest = max(len(c.encode()) for c in choices)
    response = await backend.call(lambda: backend.client.chat.completions.create(
        model=backend.model_name, messages=messages_to_openai(messages), temperature=0,
        response_format=choice_schema(choices), max_completion_tokens=longest + 16,
    ))
    usage = read_usage(getattr(response, "usage", None)) or Usage()
    backend.record_usage(usage)
    index = parse_choice_json(the_choice(response).message.content or "", choices)
    normalized = tuple(0.0 if i == index else -math.inf for i in range(len(choices)))
    return ScoreResult(index=index, normalized_logprobs=normalized,
                       token_logprobs=tuple(() for _ in choices), usage=usage)

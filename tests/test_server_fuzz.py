"""A bounded bad-input fuzzer for the OpenAI server over the in-process engine.

Hypothesis draws requests for ``/v1/completions``, ``/v1/chat/completions`` and
``/v1/aiolm/score``: valid ones, then mutated (wrong types, out-of-range and non-finite
numbers, long and odd unicode strings, nested junk, deep nesting, missing and extra fields,
odd ``stop_regex``/constraints, ``logprobs``/``top_logprobs``/``n`` combinations, bad
message roles and content parts). A second test sends bodies that are not JSON objects and
wrong content types. The draws are collected once, deterministically (``derandomize``),
then sent one by one to a real uvicorn server on 127.0.0.1 over an engine on a tiny dummy
model. A real server, not the ASGI transport: a request that blocks the server's event
loop must not block the client's clock, or a stall could never be seen.

Every answer keeps the invariants of a correct server:

- never a 5xx (a 500 is a bug; a 503 means the engine died, which no request may cause);
- a 4xx is JSON in OpenAI's error shape; a 2xx is a well-formed completion, chunk stream
  or score, in strict JSON;
- a request every correct server refuses (see :func:`must_refuse`) gets a 4xx, and a valid
  one a 2xx;
- no answer takes more than ``SLOW_S`` (requests ask for at most a few tokens), and the
  event loop never stalls: ``/health``, asked every ``PING_S`` on a connection of its own
  while the cases run, always answers within ``SLOW_S``;
- after every ``BATCH`` cases a canary completion gets the same greedy tokens as ever,
  and ``/health`` agrees with it; when a server stops, its engine is idle and
  ``check_integrity()`` is clean.

Violations are collected, not raised one by one: an engine that died is replaced (a fresh
server) so that one fault does not hide the others, and the test fails with all of them.
The counts (cases, statuses, worst latency) are printed: run with ``pytest -s``. A last
test checks that a tiny positive ``temperature`` is refused or samples greedily.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import reprlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import attrs
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from openai_server import running

from aiolm.backends.engine import Engine, LoadedModel
from aiolm.bench.models import load_for_bench
from aiolm.primitives import SELECT_METHODS
from aiolm.server import create_app

MODEL = "tiny-llama"
VOCAB = 512                 # tiny-llama's vocabulary (checked by the fixture)
EXAMPLES = 1200             # drawn cases per route
BATCH = 25                  # cases between two canaries
SLOW_S = 2.5                # the most any answer may take (a stall, not a timing:
                            # a 2-core CI machine under the whole suite has taken 1.04 s)
STALL_S = 10.0              # the client gives up here (a stall)
PING_S = 0.05               # how often /health is asked while fuzzing
COMPLETIONS, CHAT, SCORE = "/v1/completions", "/v1/chat/completions", "/v1/aiolm/score"
ROUTES = (COMPLETIONS, CHAT, SCORE)
CANARY = {"model": MODEL, "prompt": "The canary sings", "max_tokens": 4, "temperature": 0,
          "ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    loaded = load_for_bench(MODEL, load_format="dummy", device="cpu")
    assert loaded.model_config.vocab_size == VOCAB
    return loaded


# ----------------------------------------------------------------------------- bodies


@attrs.frozen
class Raw:
    """JSON text put into a body verbatim: what ``json.dumps`` will not write (``NaN``,
    ``1e309``, a 5000-digit number, nesting a few thousand deep). ``number`` is what a
    lenient parser reads it as (``None``: not a number)."""

    text: str
    number: float | None = None
    label: str = ""

    def __repr__(self) -> str:
        return self.label or self.text


def deep(depth: int, opener: str) -> Raw:
    if opener == "[":
        return Raw("[" * depth + "]" * depth, label=f"[*{depth}")
    return Raw('{"a":' * depth + "1" + "}" * depth, label=f"{{*{depth}")


def encode(body: Any) -> bytes:
    """``body`` as JSON (ASCII, lone surrogates escaped), with its :class:`Raw` parts verbatim."""
    raws: list[str] = []

    def default(value: Any) -> str:
        if not isinstance(value, Raw):
            raise TypeError(f"cannot encode {type(value).__name__}")
        raws.append(value.text)
        return f"@raw-{len(raws) - 1}@"

    text = json.dumps(body, default=default)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@raw-{i}@"', raw, 1)
    return text.encode()


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 40
_repr.maxlist = _repr.maxdict = 4


def short(value: Any) -> str:
    if isinstance(value, str) and len(value) > 40:
        return f"{value[:1]!r}*{len(value)}"
    return _repr.repr(value)


# ------------------------------------------------------------------ what must be refused

ROLES = ("system", "user", "assistant", "developer")
PART_TYPES = ("text", "image_url", "input_audio", "file", "refusal")
SAMPLING_KINDS = {
    "model": "model", "max_tokens": "int", "temperature": "num", "top_p": "num",
    "top_k": "int", "min_p": "num", "frequency_penalty": "num", "presence_penalty": "num",
    "seed": "int", "n": "int", "stream": "bool", "stream_options": "object", "stop": "stop",
    "stop_token_ids": "ids", "stop_regex": "str", "regex": "str", "grammar": "str",
    "response_format": "format", "ignore_eos": "bool", "min_tokens": "int",
    "return_token_ids": "bool",
}
#: What each known field of each route holds (unknown fields may be refused or ignored).
KINDS: dict[str, dict[str, str]] = {
    COMPLETIONS: {**SAMPLING_KINDS, "prompt": "prompt", "logprobs": "int", "best_of": "int",
                  "echo": "bool"},
    CHAT: {**SAMPLING_KINDS, "messages": "messages", "logprobs": "bool", "top_logprobs": "int",
           "max_completion_tokens": "int", "continue_final_message": "bool"},
    SCORE: {"model": "model", "prompt": "str", "messages": "messages", "continuations": "strs",
            "method": "str"},
}
REQUIRED = {COMPLETIONS: ("model", "prompt"), CHAT: ("model", "messages"),
            SCORE: ("model", "continuations")}
#: Fields not read when another is given: lenient servers need not check them.
SHADOWED = {(SCORE, "prompt"): "messages", (CHAT, "max_tokens"): "max_completion_tokens"}
#: Bounds outside which a number is refused by every server (inside, either answer is fine).
RANGES: dict[str, tuple[float | None, float | None]] = {
    "max_tokens": (0, 2**31), "max_completion_tokens": (0, 2**31), "n": (1, 2**20),
    "best_of": (1, 2**20), "min_tokens": (0, None), "logprobs": (0, 20),
    "top_logprobs": (0, 20), "temperature": (0, None), "top_p": (0, 1), "min_p": (0, 1),
    "frequency_penalty": (-2, 2), "presence_penalty": (-2, 2), "top_k": (-1, None),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(key: str, value: Any, *, integral: bool) -> str | None:
    if value is None or isinstance(value, bool):   # lenient servers read true as 1
        return None
    if isinstance(value, Raw):
        number = value.number
    elif isinstance(value, int | float):
        number = value
    elif isinstance(value, str):                    # lenient servers parse "5"
        try:
            number = float(value)
        except ValueError:
            number = None
    else:
        number = None
    if number is None:
        return "not a number"
    if not math.isfinite(number):
        return "not finite"
    if integral and number != int(number):
        return "not an integer"
    lo, hi = RANGES.get(key, (None, None))
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        return "out of range"
    return None


def _prompt(value: Any) -> str | None:
    if isinstance(value, str):
        return None
    if not isinstance(value, list) or not value:
        return "not a string, strings or token ids"
    if all(isinstance(p, str) for p in value):
        return None
    rows = value if all(isinstance(p, list) for p in value) else [value]
    for row in rows:
        if not row or not all(_is_int(t) for t in row):
            return "not a string, strings or token ids"
        if not all(0 <= t < VOCAB for t in row):
            return "a token id outside the vocabulary"
    return None


def _messages(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "not a non-empty list"
    for m in value:
        if not isinstance(m, dict):
            return "a message that is not an object"
        role = m.get("role")
        if not isinstance(role, str) or role not in (*ROLES, "tool", "function"):
            return f"role {short(role)}"
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            return "content that is not a string or parts"
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str) or kind not in PART_TYPES:
                return f"a content part {short(part)}"
            if kind == "text" and not isinstance(part.get("text"), str):
                return "a text part without text"
    return None


def _value(kind: str, key: str, value: Any) -> str | None:
    if kind == "int":
        return _number(key, value, integral=True)
    if kind == "num":
        return _number(key, value, integral=False)
    if kind == "model":
        return None if value == MODEL else "not the served model"
    if value is None:
        return None
    if kind == "bool":
        return "not a boolean" if isinstance(value, list | dict | Raw) else None
    if kind == "str":
        return None if isinstance(value, str) else "not a string"
    if kind == "stop":
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))
        return None if ok else "not a string or strings"
    if kind == "ids":
        ok = isinstance(value, list) and all(_is_int(t) and t >= 0 for t in value)
        return None if ok else "not token ids"
    if kind == "strs":
        ok = isinstance(value, list) and value and all(isinstance(s, str) for s in value)
        return None if ok else "not a non-empty list of strings"
    if kind == "object":
        return None if isinstance(value, dict) else "not an object"
    if kind == "format":
        ok = isinstance(value, dict) and isinstance(value.get("type"), str)
        return None if ok else "not an object with a type"
    if kind == "prompt":
        return _prompt(value)
    return _messages(value)   # "messages"


def must_refuse(route: str, body: dict[str, Any]) -> str | None:
    """Why every correct server refuses ``body`` on ``route`` (None: either answer is fine).

    Lenient readings are allowed (``"5"`` or ``true`` for a number, unknown fields
    ignored, ``n`` above 16); what no reading can make valid is refused: a missing or
    mistyped required field, a non-finite or out-of-range number, a container where a
    scalar goes, a role or content part that does not exist, ``top_logprobs`` without
    ``logprobs``, ``min_tokens`` over ``max_tokens``.
    """
    for key in REQUIRED[route]:
        if body.get(key) is None:
            return f"{key} missing"
    if route == SCORE and body.get("prompt") is None and body.get("messages") is None:
        return "neither prompt nor messages"
    for key, value in body.items():
        kind = KINDS[route].get(key)
        if (route, key) in SHADOWED and body.get(SHADOWED[route, key]) is not None:
            continue   # the other field wins; this one is not read
        if kind is not None and (why := _value(kind, key, value)) is not None:
            return f"{key}: {why}"
    top, want = body.get("top_logprobs"), body.get("logprobs")
    if route == CHAT and _is_int(top) and top > 0 and want in (None, False):
        return "top_logprobs without logprobs"
    low, high = body.get("min_tokens"), body.get("max_tokens")
    if (route != SCORE and _is_int(low) and _is_int(high) and low > high
            and "max_completion_tokens" not in body):
        return "min_tokens over max_tokens"
    return None


# --------------------------------------------------------------------------- strategies

WORDS = ["Hello", "The capital of France is", "def f(x):", "1, 2, 3,", "¿Qué tal?", "日本語",
         "🦀 crab", "a\tb\nc"]
STOPS = ["\n", ".", "the", "🦀", "</s>"]
HUGE_INTS = [2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1, -(2**63) - 1,
             -(2**64), 10**30]
ODD_FLOATS = [-0.0, 5e-324, 1e-320, 1e-40, 1e308, -1e308, 0.5, 2.5, -1.5]
NON_FINITE = [Raw("NaN", math.nan), Raw("Infinity", math.inf), Raw("-Infinity", -math.inf),
              Raw("1e309", math.inf), Raw("-1e309", -math.inf),
              Raw("9" * 5000, math.inf, label="9*5000")]
ODD_STRINGS = ["", " ", "\x00", "\ud800", "a\udfffb", "\u202e\u0301x", "🦀" * 3, "\r\n",
               "<|endoftext|>", "USER:", "NaN", "inf", "-1", "5", "1e309", "0x10", "true",
               "null", "{}", "[]", "\\u0000"]
ODD_REGEXES = ["", "(", ")", "[", "a|", "|", "\\", "(?i)the", "$", "^", ".", "a*", "(a*)*b",
               "(a|aa)+$", "\\p{L}+", "(?<=a)b", "\\1", "x{2,1}", "(?P<n>a)(?P=n)", "\\d{3}",
               "[^\\s]+", "\ud800", "\x00", ".{0,5}", "(?R)", "a{1000}", "\\b", "(?=a)"]
ODD_GRAMMARS = ["", "root ::= ", "root ::= root", 'root ::= "a"*', "start: /a+/", "root ::= [",
                "%%%", 'root ::= "\ud800"', 'root ::= "a" | "b"']
SCHEMAS = [{}, {"type": "object"}, {"$ref": "#"}, {"type": "string", "pattern": "("},
           {"type": "string", "pattern": "\ud800"}, {"enum": []}, {"type": "nonsense"},
           {"type": "array", "minItems": 1000000}, {"type": "string", "minLength": 10**9},
           {"type": "integer", "minimum": Raw("1e309", math.inf)}, {"properties": 5},
           {"anyOf": []}, {"not": {}}, {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}}}]
IMAGE_URLS = ["data:image/png;base64,iVBORw0KGgo=", "data:image/png;base64,!!!", "data:,x",
              "http://127.0.0.1:9/x.png", "file:///etc/passwd", ""]
REGEX_KEYS = ("stop_regex", "regex", "grammar")
EXTRA_KEYS = ["foo", "", "__proto__", "model ", "Model", "functions", "tools", "logit_bias",
              "suffix", "user", "metadata"]

text = st.sampled_from(WORDS)
token_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 8), st.sampled_from(HUGE_INTS),
    st.sampled_from(ODD_FLOATS), st.sampled_from(NON_FINITE), st.sampled_from(ODD_STRINGS),
    st.text(max_size=12),
)
nested = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 8), st.text(max_size=4)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=10,
)
deep_nesting = st.builds(deep, st.sampled_from([64, 300, 1000, 5000]), st.sampled_from(["[", "{"]))
long_strings = st.builds(lambda ch, n: ch * n, st.sampled_from(["x", "é", "🦀", "\u0301", "ab "]),
                         st.sampled_from([1000, 10_000, 100_000]))
short_junk = st.one_of(scalars, nested, st.just([]), st.just({}), deep_nesting)
junk = st.one_of(short_junk, long_strings)
many_stops = st.one_of(
    st.builds(lambda k, w: [f"{w}{i}" for i in range(k)], st.sampled_from([5, 100, 10_000]),
              st.sampled_from(["s", "🦀", ""])),
    st.builds(lambda n: ["x" * n], st.sampled_from([1000, 10_000])),
    st.lists(st.sampled_from(["", "\ud800", 5, None, ["x"]]), min_size=1, max_size=3),
)
formats = st.one_of(
    st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"},
                     {"type": "json_schema", "json_schema": []}, {"type": "regex"},
                     {"type": 5}, {}, "json", []]),
    st.builds(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}},
              st.one_of(st.sampled_from(SCHEMAS), deep_nesting, nested)),
)
parts = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from([*PART_TYPES, "xyz", ""])},
        optional={"text": st.one_of(text, scalars),
                  "image_url": st.one_of(st.sampled_from(IMAGE_URLS),
                                         st.fixed_dictionaries({"url": st.sampled_from(IMAGE_URLS)}),
                                         scalars)}),
    scalars,
)
odd_message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from([*ROLES, "tool", "function", "robot", "", "USER", " user"]),
                       scalars)},
    optional={"content": st.one_of(text, scalars, st.lists(parts, max_size=3), long_strings),
              "name": scalars, "tool_calls": nested},
)


def _value_for(key: str) -> st.SearchStrategy[Any]:
    """Junk for ``key``: regex-like fields get short odd patterns only (slow long ones are
    tested, time-bounded, elsewhere)."""
    if key in REGEX_KEYS:
        return st.one_of(short_junk, st.sampled_from(ODD_REGEXES + ODD_GRAMMARS))
    return junk


#: Targeted mutations per route: a strategy of field updates.
SPECIAL: dict[str, st.SearchStrategy[dict[str, Any]]] = {}
_common_special = [
    st.builds(lambda v: {"n": v}, st.sampled_from([-1, 0, 1, 2, 16, 17, 128, 2**31, 2**64, 2.5, "2", True])),
    st.builds(lambda v: {"stop": v}, many_stops),
    st.builds(lambda k, v: {k: v}, st.sampled_from(["stop_regex", "regex", "grammar"]),
              st.sampled_from(ODD_REGEXES + ODD_GRAMMARS)),
    st.builds(lambda v: {"response_format": v}, formats),
    st.builds(lambda v: {"stop_token_ids": v},
              st.sampled_from([["x"], [-1], [2**64], list(range(10_000)), [VOCAB + 7]])),
    st.builds(lambda lo, hi: {"min_tokens": lo, "max_tokens": hi},
              st.sampled_from([0, 3, 5, -1]), st.sampled_from([0, 2, 4])),
    st.builds(lambda v: {"seed": v}, st.sampled_from([-1, 0, 2**32, 2**63 - 1, 2**63, 2**64])),
    st.builds(lambda s, o: {"stream": s, "stream_options": o}, st.sampled_from([True, False, None]),
              st.sampled_from([{"include_usage": True}, {"include_usage": "yes"}, [], None, {"x": 1}])),
]
SPECIAL[COMPLETIONS] = st.one_of(
    *_common_special,
    st.builds(lambda v: {"prompt": v}, st.sampled_from(
        [[], [[]], [1, "a"], [-1], [VOCAB], [2**64], [[1], []], [[1, 2], "x"], 5, True,
         {"text": "x"}, "", [""], ["x"] * 100, "\ud800", "a\udfffb", [[VOCAB - 1] * 4] * 3])),
    st.builds(lambda v, s: {"logprobs": v, "stream": s},
              st.sampled_from([-1, 0, 1, 5, 20, 21, 2**64, True, 2.5, None]), st.booleans()),
    st.builds(lambda k, v: {k: v}, st.sampled_from(["echo", "best_of", "suffix", "logit_bias"]),
              st.sampled_from([True, 1, 2, "x", {"5": 100}, None])),
)
SPECIAL[CHAT] = st.one_of(
    *_common_special,
    st.builds(lambda v: {"messages": v}, st.one_of(
        st.lists(odd_message, max_size=4),
        st.sampled_from([[], {}, "hi", [{"role": "user"}], [None], [[{"role": "user", "content": "x"}]],
                         [{"role": "user", "content": "hi"}] * 1000]))),
    st.builds(lambda lp, top, s: {"logprobs": lp, "top_logprobs": top, "stream": s},
              st.sampled_from([None, False, True, 1, "true"]),
              st.sampled_from([None, -1, 0, 1, 5, 20, 21, 2**64, 2.5]), st.booleans()),
    st.builds(lambda v: {"continue_final_message": v, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]},
        st.sampled_from([True, False, "yes", []])),
    st.builds(lambda k, v: {k: v}, st.sampled_from(["max_completion_tokens", "max_tokens"]),
              st.sampled_from([-1, 0, 1, 2**31, 2**64, 2.5, "3"])),
)
SPECIAL[SCORE] = st.one_of(
    st.builds(lambda v: {"continuations": v}, st.sampled_from(
        [[], [""], ["", ""], ["x", 5], "abc", [["a"]], ["\ud800"], ["x" * 10_000, "y"],
         [f"c{i}" for i in range(100)], None])),
    st.builds(lambda v: {"messages": v}, st.lists(odd_message, max_size=3)),
    st.builds(lambda p, m: {"prompt": p, "messages": m},
              st.sampled_from(["Hi", None, 5, "", "\ud800"]),
              st.sampled_from([None, [{"role": "user", "content": "q"}],
                               [{"role": "assistant", "content": "a"}]])),
    st.builds(lambda v: {"method": v}, st.sampled_from(["", "GREEDY", 5, None, *SELECT_METHODS])),
)


@st.composite
def sampling(draw: st.DrawFn) -> dict[str, Any]:
    body = draw(st.fixed_dictionaries({}, optional={
        "temperature": st.sampled_from([0, 0.5, 1, 2]), "top_p": st.sampled_from([0.1, 0.9, 1]),
        "top_k": st.integers(0, 40), "min_p": st.sampled_from([0, 0.05]),
        "seed": st.integers(0, 2**31 - 1), "n": st.integers(1, 3), "ignore_eos": st.booleans(),
        "stop": st.lists(st.sampled_from(STOPS), min_size=1, max_size=4, unique=True),
        "frequency_penalty": st.sampled_from([-1, 0, 0.5]), "presence_penalty": st.sampled_from([0, 1.5]),
        "return_token_ids": st.booleans(), "stream": st.booleans(),
    }))
    if body.get("stream") and draw(st.booleans()):
        body["stream_options"] = {"include_usage": True}
    return body


@st.composite
def messages(draw: st.DrawFn) -> list[dict[str, Any]]:
    content = st.one_of(text, st.lists(text.map(lambda t: {"type": "text", "text": t}),
                                       min_size=1, max_size=2))
    out = []
    if draw(st.booleans()):
        out.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(text)})
    for _ in range(draw(st.integers(0, 1))):
        out += [{"role": "user", "content": draw(content)}, {"role": "assistant", "content": draw(text)}]
    out.append({"role": "user", "content": draw(content)})
    return out


@st.composite
def completion_request(draw: st.DrawFn) -> dict[str, Any]:
    prompt = draw(st.one_of(text, st.lists(text, min_size=1, max_size=3), token_ids,
                            st.lists(token_ids, min_size=1, max_size=2)))
    body = {"model": MODEL, "prompt": prompt, "max_tokens": draw(st.integers(1, 4)), **draw(sampling())}
    if draw(st.booleans()):
        body["logprobs"] = draw(st.integers(0, 5))
    return body


@st.composite
def chat_request(draw: st.DrawFn) -> dict[str, Any]:
    key = draw(st.sampled_from(["max_tokens", "max_completion_tokens"]))
    body = {"model": MODEL, "messages": draw(messages()), key: draw(st.integers(1, 4)), **draw(sampling())}
    if draw(st.booleans()):
        body["logprobs"] = True
        body["top_logprobs"] = draw(st.integers(0, 5))
    return body


@st.composite
def score_request(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL,
                            "continuations": draw(st.lists(text, min_size=1, max_size=4))}
    if draw(st.booleans()):
        body["prompt"] = draw(text)
    else:
        body["messages"] = draw(messages())
    if draw(st.booleans()):
        body["method"] = draw(st.sampled_from(SELECT_METHODS))
    return body


BASES = {COMPLETIONS: completion_request(), CHAT: chat_request(), SCORE: score_request()}


@attrs.frozen(kw_only=True)
class Case:
    """One request to send, and what it must get besides the common invariants."""

    label: str
    route: str
    body: bytes
    content_type: str | None = "application/json"
    refuse: str | None = None      # why every server refuses it (a 4xx is due)
    valid: bool = False            # unmutated: a 2xx is due
    stream: bool | None = None     # True: an SSE answer is due; False: JSON; None: either


def case_of(route: str, body: dict[str, Any], label: str) -> Case:
    stream = body.get("stream", False)
    return Case(label=label, route=route, body=encode(body), refuse=must_refuse(route, body),
                valid=label == "valid", stream=stream if isinstance(stream, bool) else None)


@st.composite
def mutated(draw: st.DrawFn, route: str) -> Case:
    """A valid request of ``route`` after 0–3 mutations (set a field to junk, drop a field,
    or a targeted change)."""
    body = draw(BASES[route])
    labels = []
    for _ in range(draw(st.sampled_from([1, 2, 3, 1, 2, 3, 0]))):   # 0: the valid request
        how = draw(st.sampled_from(["set", "set", "drop", "special", "special"]))
        if how == "set":
            key = draw(st.sampled_from([*KINDS[route], *EXTRA_KEYS]))
            body[key] = draw(_value_for(key))
            labels.append(f"{key if key.isidentifier() else repr(key)}={short(body[key])}")
        elif how == "drop" and body:
            key = draw(st.sampled_from(sorted(body)))
            del body[key]
            labels.append(f"drop {key}")
        else:
            update = draw(SPECIAL[route])
            body.update(update)
            labels.append(", ".join(f"{k}={short(v)}" for k, v in update.items()))
    if route == CHAT and all(body.get(k) is None for k in ("max_tokens", "max_completion_tokens")):
        body["max_tokens"] = 4   # chat's default (256 tokens) would make the case slow, not bad
        labels.append("max_tokens=4")
    return case_of(route, body, "; ".join(labels) or "valid")


def draw_cases(route: str, count: int) -> list[Case]:
    """Up to ``count`` different mutated requests of ``route``, the same on every run."""
    drawn: dict[bytes, Case] = {}

    @settings(max_examples=count, deadline=None, derandomize=True, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(mutated(route))
    def collect(case: Case) -> None:
        drawn.setdefault(case.body, case)

    collect()
    return list(drawn.values())


def landmarks(route: str) -> list[Case]:
    """Cases worth sending every run, whatever Hypothesis draws: each is one kind of
    request that broke (or could break) a server, at a size no random draw reaches."""
    base = {COMPLETIONS: {"model": MODEL, "prompt": "Hi", "max_tokens": 2},
            CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            SCORE: {"model": MODEL, "prompt": "Hi", "continuations": ["a", "b"]}}[route]

    def prompt_of(value: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": value}]} if route == CHAT else {"prompt": value}

    updates: list[tuple[str, dict[str, Any]]] = [
        ("a lone surrogate", prompt_of("a\ud800b")),
        ("a 4 MB string", prompt_of("x" * 4_000_000)),
    ]
    if route == SCORE:
        updates += [("a lone surrogate continuation", {"continuations": ["\udfff", "b"]}),
                    ("20000 continuations", {"continuations": [f"c{i}" for i in range(20_000)]})]
    else:
        updates += [("seed=2**64", {"seed": 2**64}), ("seed=2**63", {"seed": 2**63}),
                    ("regex with a lone surrogate", {"regex": "[a-z]\ud800"}),
                    ("stop_regex='(?R)'", {"stop_regex": "(?R)"})]
    if route == COMPLETIONS:
        updates.append(("20000 prompts", {"prompt": ["x"] * 20_000, "max_tokens": 1}))
    cases = [case_of(route, {**base, **update}, label) for label, update in updates]
    cases.append(Case(label="nesting 100000 deep", route=route,
                      body=encode({**base, "metadata": deep(100_000, "[")})))
    return cases


# ------------------------------------------------------------------------- the server


@attrs.define(eq=False)
class Watch:
    """What is seen of a server from outside the requests under test: how long its
    ``/health`` took at worst (asked every ``PING_S`` on a connection of its own, so an
    event loop that blocks shows), and, filled in by the lifespan as it stops, whether its
    engine was idle and clean."""

    doing: str = "nothing yet"          # the case being sent (set by the fuzz loop)
    health_worst_s: float = 0.0
    health_worst: str = ""
    problem: str | None = None
    checked: bool = False
    stop: threading.Event = attrs.field(factory=threading.Event)

    def ping(self, base_url: str) -> None:
        with client_of(base_url) as client:
            while not self.stop.wait(PING_S):
                start = time.perf_counter()
                with contextlib.suppress(httpx.HTTPError):
                    client.get("/health")
                if (took := time.perf_counter() - start) > self.health_worst_s:
                    self.health_worst_s, self.health_worst = took, self.doing


async def settle(engine: Engine, watch: Watch) -> None:
    """Wait (bounded) for ``engine`` to go idle, then record whether its KV accounting holds."""
    try:
        with anyio.fail_after(10):
            while (s := engine.statistics()).running_requests or s.queued_requests:
                await anyio.sleep(0.01)
            report = await engine.check_integrity()
    except Exception as exc:  # a dead engine, a broken invariant, a timeout: all reported
        watch.problem = f"{type(exc).__name__}: {exc}"
    else:
        if not report.idle or report.request_slots or report.locked_tokens:
            watch.problem = f"not idle and clean when every request ended: {report}"
    watch.checked = True


def client_of(base_url: str) -> httpx.Client:
    """A client opening a connection per request."""
    # NOTE: the test server's connections (a socket made without IPPROTO_TCP, so asyncio
    # leaves Nagle on) answer a second request on a kept-alive connection ~40 ms late.
    return httpx.Client(base_url=base_url, timeout=STALL_S,
                        limits=httpx.Limits(max_keepalive_connections=0))


@contextlib.contextmanager
def serve(tiny: LoadedModel) -> Iterator[tuple[httpx.Client, Watch]]:
    """A fresh engine over ``tiny`` served by uvicorn, a client for it (``STALL_S``
    timeout), and its :class:`Watch` (complete once this exits)."""
    # NOTE: an engine whose loop froze (a stall this file reports) never gives its weights
    # back; the next server loads its own.
    weights = tiny if not tiny.in_use else load_for_bench(MODEL, load_format="dummy", device="cpu")
    engine = Engine(weights, max_total_tokens=2048)
    watch = Watch()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> Any:
        async with engine:
            yield
            await settle(engine, watch)

    with running(create_app(engine, lifespan=lifespan), timeout=20) as url:
        base_url = url.removesuffix("/v1")
        pinger = threading.Thread(target=watch.ping, args=(base_url,), daemon=True)
        pinger.start()
        try:
            with client_of(base_url) as client:
                yield client, watch
        finally:
            watch.stop.set()
            pinger.join()


# ------------------------------------------------------------------------ the checks


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str) -> Any:
    """Parse as JSON proper (clients choke on ``NaN``/``Infinity``); ValueError if not."""
    return json.loads(text, parse_constant=_reject_constant)


def error_shape(answer: httpx.Response) -> str | None:
    if not answer.headers.get("content-type", "").startswith("application/json"):
        return f"an error with content-type {answer.headers.get('content-type')!r}"
    try:
        body = strict_json(answer.text)
    except ValueError:
        return "an error body that is not JSON"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return "no 'error' object"
    if not isinstance(err.get("message"), str) or not err["message"]:
        return "no error message"
    if not isinstance(err.get("type"), str):
        return "no error type"
    if any(k not in err or not isinstance(err[k], str | None) for k in ("param", "code")):
        return "error param/code missing or not strings"
    return None


def _usage(usage: Any) -> str | None:
    names = ("prompt_tokens", "completion_tokens", "total_tokens")
    if not isinstance(usage, dict) or not all(_is_int(usage.get(k)) and usage[k] >= 0 for k in names):
        return f"bad usage {short(usage)}"
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        return "usage does not add up"
    return None


def _choices(route: str, choices: Any, *, chunk: bool) -> str | None:
    if not isinstance(choices, list):
        return "choices is not a list"
    for c in choices:
        if not isinstance(c, dict) or not _is_int(c.get("index")):
            return f"bad choice {short(c)}"
        if c.get("finish_reason") not in ((None, "stop", "length") if chunk else ("stop", "length")):
            return f"finish_reason {c.get('finish_reason')!r}"
        if route == COMPLETIONS:
            ok = isinstance(c.get("text"), str)
        elif chunk:
            ok = isinstance(c.get("delta"), dict)
        else:
            message = c.get("message")
            ok = isinstance(message, dict) and message.get("role") == "assistant" \
                and isinstance(message.get("content"), str)
        if not ok:
            return f"bad choice {short(c)}"
    return None


def whole_answer(route: str, body: Any) -> str | None:
    if not isinstance(body, dict):
        return "not an object"
    if route == SCORE:
        lps = body.get("normalized_logprobs")
        if body.get("object") != "aiolm.score" or not isinstance(lps, list) or not lps:
            return "not a score"
        if not _is_int(body.get("index")) or not 0 <= body["index"] < len(lps):
            return f"score index {body.get('index')!r} of {len(lps)}"
        if not isinstance(body.get("choice"), str):
            return "no chosen continuation"
        return _usage(body.get("usage"))
    want = "text_completion" if route == COMPLETIONS else "chat.completion"
    if body.get("object") != want or not body.get("choices"):
        return f"object {body.get('object')!r} with {short(body.get('choices'))}"
    indices = [c.get("index") for c in body["choices"] if isinstance(c, dict)]
    if indices != list(range(len(body["choices"]))):
        return f"choice indices {indices}"
    return _choices(route, body["choices"], chunk=False) or _usage(body.get("usage"))


def stream_answer(route: str, text: str) -> str | None:
    events = [e for e in text.split("\n\n") if e.strip()]
    if not events or events[-1] != "data: [DONE]":
        return "the stream does not end with [DONE]"
    finished: set[int] = set()
    opened: set[int] = set()
    for event in events[:-1]:
        if not event.startswith("data: "):
            return f"an event that is not data: {event[:40]!r}"
        try:
            chunk = strict_json(event[6:])
        except ValueError:
            return f"an event that is not JSON: {event[:40]!r}"
        if not isinstance(chunk, dict):
            return "a chunk that is not an object"
        if isinstance(chunk.get("error"), dict):
            if chunk["error"].get("type") == "server_error":
                return f"a server error mid-stream: {short(chunk['error'])}"
            continue
        want = "text_completion" if route == COMPLETIONS else "chat.completion.chunk"
        if chunk.get("object") != want:
            return f"a chunk of object {chunk.get('object')!r}"
        if "usage" in chunk and chunk["usage"] is not None and (why := _usage(chunk["usage"])):
            return why
        if why := _choices(route, chunk.get("choices"), chunk=True):
            return why
        for c in chunk["choices"]:
            opened.add(c["index"])
            if c["finish_reason"] is not None:
                finished.add(c["index"])
    if opened != finished:
        return f"choices {sorted(opened - finished)} never finished"
    return None


@attrs.define(eq=False)
class Tally:
    """What a fuzz run saw: counts, and the violations of the invariants."""

    name: str
    cases: int = 0
    statuses: collections.Counter[str] = attrs.field(factory=collections.Counter)
    worst_s: float = 0.0
    worst: str = ""
    health_worst_s: float = 0.0
    health_worst: str = ""
    canaries: int = 0
    servers: int = 0
    violations: list[tuple[str, str]] = attrs.field(factory=list)
    canary_ids: list[int] | None = None

    def violate(self, kind: str, detail: str) -> None:
        self.violations.append((kind, detail))

    def summary(self) -> str:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
        return (f"[fuzz {self.name}] {self.cases} cases on {self.servers} server(s), "
                f"{self.canaries} canaries; statuses {{{statuses}}}; "
                f"worst {self.worst_s:.3f} s ({self.worst}); worst /health meanwhile "
                f"{self.health_worst_s:.3f} s (during {self.health_worst}); "
                f"{len(self.violations)} violations")

    def report(self) -> str:
        by_kind: dict[str, list[str]] = collections.defaultdict(list)
        for kind, detail in self.violations:
            by_kind[kind].append(detail)
        lines = [self.summary()]
        for kind, details in by_kind.items():
            lines.append(f"  {kind}: {len(details)}")
            lines += [f"    - {d}" for d in details[:4]]
        return "\n".join(lines)


def send(client: httpx.Client, case: Case, tally: Tally) -> bool:
    """Send ``case`` and check the answer; False when the engine died answering it."""
    headers = {} if case.content_type is None else {"content-type": case.content_type}
    start = time.perf_counter()
    tally.cases += 1
    try:
        answer = client.post(case.route, content=case.body, headers=headers)
    except httpx.TimeoutException:
        tally.statuses["timeout"] += 1
        tally.violate("stall", f"{case.label}: no answer within {STALL_S} s")
        return True
    except httpx.HTTPError as exc:
        tally.statuses["dropped"] += 1
        tally.violate("dropped", f"{case.label}: {type(exc).__name__}: {exc}")
        return True
    seconds = time.perf_counter() - start
    status = answer.status_code
    tally.statuses[str(status)] += 1
    if seconds > tally.worst_s:
        tally.worst_s, tally.worst = seconds, f"{case.label} -> {status}"
    where = f"{case.label} -> {status}"
    if seconds > SLOW_S:
        tally.violate("slow", f"{where} after {seconds:.2f} s")
    if status == 503:
        tally.violate("engine died", f"{where}: {answer.text[:200]}")
        return False
    if status >= 500:
        tally.violate("5xx", f"{where}: {answer.text[:200]!r}")
    elif status >= 400:
        if why := error_shape(answer):
            tally.violate("error shape", f"{where}: {why}: {answer.text[:120]!r}")
        if case.valid:
            tally.violate("refused a valid request", f"{where}: {answer.text[:200]}")
    elif 200 <= status < 300:
        if case.refuse:
            tally.violate("accepted", f"{where} although every server refuses it ({case.refuse})")
        sse = answer.headers.get("content-type", "").startswith("text/event-stream")
        if case.stream is not None and sse != case.stream:
            tally.violate("malformed answer", f"{where}: stream={case.stream} but content-type "
                          f"{answer.headers.get('content-type')!r}")
        elif sse:
            if why := stream_answer(case.route, answer.text):
                tally.violate("malformed answer", f"{where}: {why}")
        else:
            try:
                why = whole_answer(case.route, strict_json(answer.text))
            except ValueError as exc:
                why = f"not JSON ({exc})"
            if why:
                tally.violate("malformed answer", f"{where}: {why}: {answer.text[:120]!r}")
    else:
        tally.violate("odd status", where)
    return True


def canary(client: httpx.Client, tally: Tally, after: str) -> str:
    """Send the canary: "ok", "dead" (the engine died) or "frozen" (no answer)."""
    tally.canaries += 1
    try:
        answer = client.post(COMPLETIONS, json=CANARY)
        health = client.get("/health")
    except httpx.TimeoutException:
        tally.violate("canary", f"no answer to the canary within {STALL_S} s after {after}")
        return "frozen"
    try:
        ids = answer.json()["choices"][0]["token_ids"] if answer.status_code == 200 else None
    except (ValueError, LookupError, TypeError):
        ids = None
    if ids is None:
        tally.violate("canary", f"the canary got {answer.status_code} after {after}: {answer.text[:160]}")
        if health.status_code == 200:
            tally.violate("health", f"/health said {health.text} while the canary failed")
        return "dead"
    if tally.canary_ids is None:
        tally.canary_ids = ids
    elif ids != tally.canary_ids:
        tally.violate("canary", f"greedy canary tokens changed after {after}: {ids} != {tally.canary_ids}")
    if health.status_code != 200:
        tally.violate("health", f"/health said {health.status_code} while the engine answers")
    return "ok"


def fuzz(tiny: LoadedModel, name: str, cases: list[Case]) -> Tally:
    """Send ``cases`` in order, a canary after each batch. A request that kills the engine
    ends its batch, and a fresh server takes the rest; an engine that froze ends the run."""
    tally = Tally(name=name)
    pending = collections.deque(cases)
    state = "ok"
    while pending and state != "frozen":
        tally.servers += 1
        with serve(tiny) as (client, watch):
            state = "ok"
            while pending and state == "ok":
                first, alive = tally.cases + 1, True
                for _ in range(BATCH):
                    if not pending:
                        break
                    case = pending.popleft()
                    watch.doing = case.label
                    if not (alive := send(client, case, tally)):
                        break
                watch.doing = "the canary"
                state = canary(client, tally, f"cases {first}-{tally.cases}")
                if not alive and state == "ok":
                    tally.violate("engine died", "a request was answered 503, yet the canary passed")
        if watch.health_worst_s > SLOW_S:
            tally.violate("event loop stalled", f"/health took {watch.health_worst_s:.2f} s "
                          f"while sending {watch.health_worst}")
        if watch.health_worst_s > tally.health_worst_s:
            tally.health_worst_s, tally.health_worst = watch.health_worst_s, watch.health_worst
        if state == "ok" and watch.problem:
            tally.violate("integrity", f"when server {tally.servers} stopped: {watch.problem}")
        elif state == "ok" and not watch.checked:
            tally.violate("integrity", f"server {tally.servers} stopped without checking its engine")
    print("\n" + tally.summary())
    return tally


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("route", ROUTES)
def test_mutated_requests_keep_the_server_invariants(tiny, route):
    cases = draw_cases(route, EXAMPLES) + landmarks(route)
    tally = fuzz(tiny, route, cases)
    assert not tally.violations, tally.report()


def raw_cases(route: str) -> list[Case]:
    """Bodies that are not JSON objects, and JSON sent as something else."""
    valid = {COMPLETIONS: {"model": MODEL, "prompt": "Hi", "max_tokens": 2},
             CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
             SCORE: {"model": MODEL, "prompt": "Hi", "continuations": ["a", "b"]}}[route]
    good = encode(valid)
    cases = [Case(label=f"content-type {ct!r}", route=route, body=good, content_type=ct,
                  refuse="not JSON content") for ct in
             ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
              "text/html", "application/xml")]
    cases += [Case(label=f"content-type {ct!r}", route=route, body=good, content_type=ct, valid=True)
              for ct in ("application/json", "application/json; charset=utf-8")]
    cases += [Case(label=f"content-type {ct!r}", route=route, body=good, content_type=ct)
              for ct in (None, "application/JSON", "application/vnd.api+json", "")]
    bodies: list[tuple[str, bytes]] = [
        ("empty", b""), ("truncated", good[:-1]), ("trailing junk", good + b" x"),
        ("single quotes", good.replace(b'"', b"'")), ("invalid utf-8", b'{"model": "\xff\xfe"}'),
        ("a list", b"[" + good + b"]"), ("a string", b'"hello"'), ("a number", b"5"),
        ("null", b"null"), ("true", b"true"), ("NaN", b"NaN"), ("nesting 300 deep", b"[" * 300 + b"]" * 300),
        ("nesting 5000 deep", b"[" * 5000 + b"]" * 5000),
        ("objects 5000 deep", b'{"a":' * 5000 + b"1" + b"}" * 5000),
        ("NUL bytes", b"\x00" * 64), ("over 8 MiB", b'{"x": "' + b"x" * (8 * 1024 * 1024) + b'"}'),
    ]
    cases += [Case(label=label, route=route, body=body, refuse="not a JSON object")
              for label, body in bodies]
    # Well-formed JSON in odd encodings: lenient servers may take them, none may break.
    cases += [
        Case(label="raw UTF-8 text", route=route, valid=True,
             body=json.dumps({**valid, "user": "é🦀"}, ensure_ascii=False).encode()),
        Case(label="UTF-8 BOM", route=route, body=b"\xef\xbb\xbf" + good),
        Case(label="UTF-16", route=route, body=good.decode().encode("utf-16")),
        Case(label="duplicate keys", route=route, body=b'{"model": "x", ' + good[1:]),
    ]
    return cases


def test_malformed_bodies_and_content_types_are_refused(tiny):
    cases = [case for route in ROUTES for case in raw_cases(route)]
    tally = fuzz(tiny, "raw bodies", cases)
    assert not tally.violations, tally.report()


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_a_tiny_positive_temperature_is_refused_or_samples_greedily(tiny, temperature):
    body: dict[str, Any] = {"model": MODEL, "prompt": "Hello there", "max_tokens": 6,
                            "ignore_eos": True, "return_token_ids": True}
    with serve(tiny) as (client, _watch):
        greedy = client.post(COMPLETIONS, json={**body, "temperature": 0})
        tiny_t = client.post(COMPLETIONS, json={**body, "temperature": temperature})
    assert greedy.status_code == 200
    if tiny_t.status_code != 400:
        assert tiny_t.status_code == 200
        assert tiny_t.json()["choices"][0]["token_ids"] == greedy.json()["choices"][0]["token_ids"]

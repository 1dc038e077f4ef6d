"""API speculative execution on the 5-field extraction program: API calls and prompt tokens
with speculation off vs on, and whether the parsed fields agree.

The "API" is aiolm's own OpenAI-compatible server (uvicorn on 127.0.0.1, a free port, in a
background thread) over the in-process engine with the embedded SmolLM2-135M-Instruct (or
``--model``); the program runs on ``aiolm.OpenAI`` pointed at it, as it would against any
OpenAI-compatible API. Calls are counted at the server; tokens are the API's usage.

    .venv/bin/python benchmarks/api_speculation.py [--model PATH] [--spec-tokens 64] [--chat]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import openai
import uvicorn

import aiolm
from aiolm import gen, program, user
from aiolm.server import create_app

FIELDS = ("name", "job", "age", "city", "hobby")
EXAMPLE = ("Text: Maria Lopez is a 41-year-old nurse from Madrid who loves painting.\n"
           "name: Maria Lopez\njob: nurse\nage: 41\ncity: Madrid\nhobby: painting\n\n")
PEOPLE = (
    "John Carter is a 35-year-old teacher from Boston who enjoys fishing.",
    "Aiko Tanaka, 28, works as a software engineer in Tokyo and plays the violin.",
    "Pierre Dubois is a 52-year-old chef living in Lyon; his hobby is cycling.",
    "Fatima Khan is a 23-year-old student in Lahore who loves chess.",
    "Lars Nilsson, a 60-year-old fisherman from Bergen, spends his free time sailing.",
    "Priya Sharma is a 31-year-old doctor in Mumbai who likes yoga.",
)


@program
async def extract(s, text: str):
    """The completion-model form: a few-shot prompt, then one gen per field."""
    s += "Extract the person's details.\n\n" + EXAMPLE + "Text: " + text + "\n"
    for field in FIELDS:
        s += field + ":" + gen(field, stop="\n", max_tokens=16) + "\n"


@program
async def extract_chat(s, text: str):
    """The chat-model form: every field inside one assistant turn."""
    s += user("Extract the person's details as lines 'field: value'.\n\n" + EXAMPLE + "Text: " + text)
    with s.assistant():
        for field in FIELDS:
            s += field + ":" + gen(field, stop="\n", max_tokens=16) + "\n"


class CallCounter:
    """ASGI wrapper counting the generation POSTs the server receives."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls: collections.Counter[str] = collections.Counter()

    def total(self) -> int:
        return self.calls["/v1/completions"] + self.calls["/v1/chat/completions"]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            self.calls[scope["path"]] += 1
        await self.app(scope, receive, send)


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """uvicorn on 127.0.0.1 (a free port) in a thread; yields the ``/v1`` base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


async def measure(url: str, model: str, counter: CallCounter, *, chat: bool,
                  spec_tokens: int | None) -> dict[str, Any]:
    async with openai.AsyncOpenAI(base_url=url, api_key="none") as client:
        api = aiolm.OpenAI(model, client=client, chat=chat, spec_tokens=spec_tokens)
        before = counter.total()
        started = time.perf_counter()
        states = await (extract_chat if chat else extract).run_batch(
            [{"text": t} for t in PEOPLE], backend=api, max_concurrency=1, raise_errors=True,
            temperature=0.0)
        seconds = time.perf_counter() - started
    stats = api.statistics()
    return {
        "spec_tokens": spec_tokens,
        "calls": counter.total() - before,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "calls_saved": stats.calls_saved,
        "seconds": round(seconds, 2),
        "fields": [{f: s[f].strip() for f in FIELDS} for s in states],
    }


async def run(url: str, model: str, counter: CallCounter, args: argparse.Namespace) -> dict[str, Any]:
    off = await measure(url, model, counter, chat=args.chat, spec_tokens=None)
    on = await measure(url, model, counter, chat=args.chat, spec_tokens=args.spec_tokens)
    return {
        "programs": len(PEOPLE), "fields_per_program": len(FIELDS),
        "mode": "chat" if args.chat else "completion", "off": off, "on": on,
        "call_reduction": round(off["calls"] / on["calls"], 2),
        "prompt_token_reduction": round(off["prompt_tokens"] / max(1, on["prompt_tokens"]), 2),
        "same_fields": off["fields"] == on["fields"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2)")
    parser.add_argument("--spec-tokens", type=int, default=64)
    parser.add_argument("--chat", action="store_true", help="use the chat form of the program")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    engine = aiolm.Engine(args.model, device=args.device)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        async with engine:
            yield

    counter = CallCounter(create_app(engine, lifespan=lifespan))
    with serving(counter) as url:
        result = anyio.run(run, url, engine.model_name, counter, args)
    for mode in ("off", "on"):
        r = result[mode]
        print(f"speculation {mode:>3}: {r['calls']:3d} calls, {r['prompt_tokens']:5d} prompt tokens, "
              f"{r['completion_tokens']:4d} completion tokens, {r['seconds']:6.2f} s")
    print(f"calls {result['call_reduction']}x fewer, prompt tokens {result['prompt_token_reduction']}x "
          f"fewer, same fields: {result['same_fields']}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

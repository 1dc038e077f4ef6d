"""aiolm programs on aiolm.OpenAI pointed at aiolm's own server (over the ScriptedBackend):
the frontend conformance programs, and API speculative execution counted at the server."""

from __future__ import annotations

import anyio
import conformance
import openai
import pytest
from openai_server import API_KEY, CallCounter, running

import aiolm
from aiolm import gen, program, user
from aiolm.backends import ScriptedBackend
from aiolm.server import create_app

pytestmark = pytest.mark.anyio

#: The checks whose programs are chat conversations (the rest put text outside any turn).
CHAT_CHECKS = (conformance.check_multi_turn_chat, conformance.check_select, conformance.check_image)


@pytest.fixture(scope="module")
def conformance_server():
    backend = conformance.scripted_backend(delay=0.002)
    with running(create_app(backend, api_key=API_KEY)) as url:
        yield url, backend


async def remote(url: str, *, chat: bool, **kw) -> aiolm.OpenAI:
    client = openai.AsyncOpenAI(base_url=url, api_key=API_KEY)
    return aiolm.OpenAI("scripted", client=client, chat=chat, backoff=0.01, **kw)


@pytest.mark.parametrize("check", conformance.CHECKS, ids=lambda c: c.__name__)
async def test_conformance_on_a_completion_model_over_http(check, conformance_server):
    url, backend = conformance_server
    api = await remote(url, chat=False)
    async with api.client:
        await check(api)
    # A cancelled program closed its connections; the server then aborts those streams.
    with anyio.fail_after(5):
        while backend.statistics().active_streams:
            await anyio.sleep(0.01)


@pytest.mark.parametrize("check", CHAT_CHECKS, ids=lambda c: c.__name__)
async def test_conformance_on_a_chat_model_over_http(check, conformance_server):
    url, _ = conformance_server
    api = await remote(url, chat=True)
    async with api.client:
        await check(api)


# --------------------------------------------------------------------------- speculation

FIELDS = ("name", "job", "age", "city", "hobby")


def person(k: int) -> dict[str, str]:
    return {"name": f"Alice Smith {k}", "job": "engineer", "age": str(30 + k), "city": "Paris",
            "hobby": "chess"}


def record_model(labels: tuple[str, ...] = FIELDS):
    """A scripted model that writes person k's record, naming the fields ``labels``.

    Asked for a field (the prompt ends with ``label:``), it answers it and goes on with the
    rest of the record; at the start of an assistant turn it writes the whole record.
    """
    def reply(prompt: str) -> str:
        k = int(prompt.split("Person ", 1)[1].split(".", 1)[0])
        lines = [f"{label}: {person(k)[f]}" for label, f in zip(labels, FIELDS, strict=True)]
        tail = prompt.rsplit("\n", 1)[-1].removeprefix("ASSISTANT: ")
        if not tail:
            return "\n".join(lines) + "\n\nThat is all."
        label = tail.removesuffix(":")
        names = labels if label in labels else FIELDS
        if label not in names:
            return " unknown\n"
        i = names.index(label)
        return " " + person(k)[FIELDS[i]] + "\n" + "".join(line + "\n" for line in lines[i + 1:]) + "\nThat is all."
    return reply


@program
async def extract(s, k: int):
    s += f"Person {k}. Write their record.\n"
    for f in FIELDS:
        s += f + ":" + gen(f, stop="\n", max_tokens=16) + "\n"


@program
async def extract_chat(s, k: int):
    s += user(f"Person {k}. Write their record: name, job, age, city, hobby.")
    with s.assistant():
        for f in FIELDS:
            s += f + ":" + gen(f, stop="\n", max_tokens=16) + "\n"


async def fields_and_calls(url: str, counter: CallCounter, *, chat: bool, spec: int | None,
                           runs: int = 1) -> tuple[list[dict[str, str]], int, aiolm.OpenAI]:
    api = await remote(url, chat=chat, spec_tokens=spec)
    before = counter.generation_calls
    async with api.client:
        states = await (extract_chat if chat else extract).run_batch(
            [{"k": k} for k in range(runs)], backend=api, max_concurrency=runs, raise_errors=True)
    return [{f: s[f] for f in FIELDS} for s in states], counter.generation_calls - before, api


@pytest.fixture(scope="module", params=["same-format", "other-format"])
def record_server(request):
    """The record model writing the program's field names, or its own ("occupation")."""
    labels = FIELDS if request.param == "same-format" else ("name", "occupation", "age", "city", "hobby")
    counter = CallCounter(create_app(ScriptedBackend(record_model(labels)), api_key=API_KEY))
    with running(counter) as url:
        yield url, counter, request.param


@pytest.fixture(scope="module")
def same_format_server():
    counter = CallCounter(create_app(ScriptedBackend(record_model()), api_key=API_KEY))
    with running(counter) as url:
        yield url, counter


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
async def test_speculation_makes_fewer_calls_with_the_same_fields(record_server, chat):
    url, counter, fmt = record_server
    plain, plain_calls, _ = await fields_and_calls(url, counter, chat=chat, spec=None)
    fast, fast_calls, api = await fields_and_calls(url, counter, chat=chat, spec=64)
    assert fast == plain
    assert plain[0]["name"] == " Alice Smith 0" and plain[0]["age"] == " 30"
    assert plain_calls == len(FIELDS)
    stats = api.statistics()
    if fmt == "same-format":
        assert fast_calls == 1
        assert stats.calls_saved == len(FIELDS) - 1 and stats.speculation_misses == 0
    else:
        # "job:" does not match the speculated "occupation:": one miss, one new speculation.
        assert fast_calls == 2
        assert stats.calls_saved == len(FIELDS) - 2
    assert stats.calls == fast_calls


async def test_speculation_state_is_per_run_under_run_batch(same_format_server):
    url, counter = same_format_server
    runs = 6
    fields, calls, api = await fields_and_calls(url, counter, chat=False, spec=64, runs=runs)
    assert [f["name"] for f in fields] == [f" Alice Smith {k}" for k in range(runs)]
    assert [f["age"] for f in fields] == [f" {30 + k}" for k in range(runs)]
    assert calls == runs and api.statistics().calls_saved == runs * (len(FIELDS) - 1)


async def test_speculation_in_fork_branches(same_format_server):
    url, counter = same_format_server

    @program
    async def two_people(s):
        async with s.fork(2) as forks:
            for k, f in enumerate(forks):
                f += f"Person {k}. Write their record.\n"
                for name in FIELDS:
                    f += name + ":" + gen(name, stop="\n", max_tokens=16) + "\n"
        forks.join()

    api = await remote(url, chat=False, spec_tokens=64)
    before = counter.generation_calls
    async with api.client:
        state = await two_people.run(backend=api)
    assert state["name"] == [" Alice Smith 0", " Alice Smith 1"]
    assert state["age"] == [" 30", " 31"]
    assert counter.generation_calls - before == 2

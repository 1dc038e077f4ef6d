"""Frontend conformance programs, reusable on any backend.

Each ``check_*(backend)`` runs one program (the behaviours of SGLang's frontend test suite,
written for aiolm's async API), asserts what holds for any sane model, and returns the state
so a test that knows the model's replies can assert more. ``SCRIPTED_REPLIES`` is a
ScriptedBackend "model" that answers every program here; ``scripted_backend()`` builds it.

Checks that need a capability the backend lacks assert that the program raises
``UnsupportedFeature`` instead.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from typing import Any

import anyio

import aiolm
from aiolm import assistant, gen, image, program, select, system, user
from aiolm.backends import Backend, ScriptedBackend
from aiolm.constraints import Constraint, Matcher
from aiolm.errors import ConstraintError, UnsupportedFeature, VariableNotReady

# --------------------------------------------------------------------------- the scripted model

#: prompt ending -> the scripted model's continuation (tried in order).
SCRIPTED_REPLIES: tuple[tuple[str, str], ...] = (
    ("capital of France?\nA:", " Paris\nQ: What is the capital of Spain?\nA: Madrid"),
    ("What is the capital of France?\nASSISTANT: ", "The capital of France is Paris."),
    ("And of Germany?\nASSISTANT: ", "Berlin is the capital of Germany."),
    ("Answer yes or no.\nASSISTANT: ", "yes, it is."),
    ("How many legs does a spider have?\nA: ", "8"),
    ("Paris as JSON: ", '{"name": "Paris", "population": 2102650}'),
    ("Thought 0:", " I should look up the capital of France.\nAction 0: Search"),
    ("Action 0:", " Search"),
    ("Thought 1:", " The capital is Paris, so I can answer.\n"),
    ("Action 1:", " Finish"),
    ("Call: calculate(", "12 * 7) and then I will report the result."),
    ("Overall:", " three short documents\nThe end."),
    ("What is in the image?\nASSISTANT: ", "A single red pixel."),
    ("Inside ", "the scope\nand more"),
    ("Intro:", " " + " ".join(f"word{i}" for i in range(400))),
)


def scripted_reply(prompt: str) -> str:
    """The conformance model: a fixed continuation per program prompt."""
    for ending, reply in SCRIPTED_REPLIES:
        if prompt.endswith(ending):
            return reply
    tail = prompt.rsplit("\n", 1)[-1]
    if tail.startswith("Fact ") and tail.endswith(":"):
        return f" Paris fact number {tail[5:-1]}.\nFact 99: unused"
    if tail.startswith("Doc ") and tail.endswith(": "):
        return f"summary of document {tail[4:-2]}\nignored"
    if tail.startswith("Number ") and tail.endswith(":"):
        return f" {tail[7:-1]} squared is {int(tail[7:-1]) ** 2}\nmore"
    if tail.startswith("Branch ") or tail.startswith("Slow "):
        return " " + " ".join(f"tick{i}" for i in range(400))
    return "I do not know."


def scripted_backend(*, delay: float = 0.0) -> ScriptedBackend:
    """A ScriptedBackend that answers every conformance program."""
    return ScriptedBackend(scripted_reply, delay=delay)


def tiny_png() -> bytes:
    """A valid 1x1 red PNG, built without any imaging library."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- programs


@program
async def few_shot_qa(s, question: str):
    s += "Q: What is 1 + 1?\nA: 2\n"
    s += "Q: What is the capital of Japan?\nA: Tokyo\n"
    s += "Q: " + question + "\nA:" + gen("answer", max_tokens=16, stop="\n")


async def check_few_shot_qa(backend: Backend) -> aiolm.ProgramState:
    state = await few_shot_qa.run(question="What is the capital of France?", backend=backend)
    answer = state["answer"]
    assert isinstance(answer, str) and "\n" not in answer
    assert state.text().endswith("\nA:" + answer)
    assert state.meta("answer").finish_reason in ("stop", "length")
    return state


@program
async def multi_turn(s):
    s += system("You are a helpful assistant.")
    with s.user():
        s += "What is the capital of France?"
    s += assistant(gen("answer1", max_tokens=24))
    with s.user():
        s += "And of Germany?"
    with s.assistant():
        s += gen("answer2", max_tokens=24)


async def check_multi_turn_chat(backend: Backend) -> aiolm.ProgramState:
    state = await multi_turn.run(backend=backend)
    assert state.messages() == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": state["answer1"]},
        {"role": "user", "content": "And of Germany?"},
        {"role": "assistant", "content": state["answer2"]},
    ]
    return state


@program
async def yes_no(s):
    s += user("Is the sky blue? Answer yes or no.")
    s += assistant(select("answer", choices=["yes", "no"]))


async def check_select(backend: Backend) -> aiolm.ProgramState:
    state = await yes_no.run(backend=backend)
    assert state["answer"] in ("yes", "no")
    assert state.messages()[-1] == {"role": "assistant", "content": state["answer"]}
    assert len(state.meta("answer").choice_logprobs) == 2
    return state


@program
async def spider(s):
    s += "Q: How many legs does a spider have?\nA: " + gen("legs", dtype=int, max_tokens=8)


async def check_dtype_int(backend: Backend) -> aiolm.ProgramState:
    state = await spider.run(backend=backend)
    assert type(state["legs"]) is int
    return state


CITY_REGEX = r'\{"name": "[A-Za-z ]{1,20}", "population": [0-9]{1,9}\}'


@program
async def city_json(s):
    s += "Describe Paris as JSON: " + gen("json", regex=CITY_REGEX, max_tokens=64)


async def check_json_regex(backend: Backend) -> aiolm.ProgramState:
    state = await city_json.run(backend=backend)
    data = json.loads(state["json"])
    assert set(data) == {"name", "population"}
    assert isinstance(data["name"], str) and isinstance(data["population"], int)
    return state


@program
async def react(s, max_steps: int = 3):
    s += "Question: What is the population of the capital of France?\n"
    for step in range(max_steps):
        s += f"Thought {step}:" + gen(f"thought{step}", stop="\n", max_tokens=32) + "\n"
        s += f"Action {step}:" + select(f"action{step}", choices=[" Search", " Finish"]) + "\n"
        if await s.get(f"action{step}") == " Finish":  # read mid-program and branch on it
            break
        s += f"Observation {step}: Paris has about two million inhabitants.\n"


async def check_react(backend: Backend) -> tuple[aiolm.ProgramState, list[str]]:
    actions: list[str] = []

    @program
    async def traced(s):
        await react(s)
        actions.extend(a for a in (s[f"action{i}"] for i in range(3) if f"action{i}" in s))

    state = await traced.run(backend=backend)
    assert actions and all(a in (" Search", " Finish") for a in actions)
    assert actions[-1] == " Finish" or len(actions) == 3
    assert " Finish" not in actions[:-1]  # the program stopped at the first Finish
    # An observation follows every Search, and nothing follows Finish.
    assert state.text().count("Observation") == actions.count(" Search")
    return state, actions


@program
async def calculator(s):
    s += "Use the calculator to compute 12 times 7.\n"
    s += "Call: calculate(" + gen("expr", stop=")", max_tokens=16) + ")\n"
    expr = await s.get("expr")
    terms = [t.strip() for t in expr.split("*")]
    if len(terms) == 2 and all(t.isdigit() for t in terms):
        s += f"Result: {int(terms[0]) * int(terms[1])}\n"
    else:
        s += "Result: error\n"


async def check_tool_use(backend: Backend) -> aiolm.ProgramState:
    state = await calculator.run(backend=backend)
    assert ")" not in state["expr"]
    assert "Call: calculate(" + state["expr"] + ")\nResult: " in state.text()
    return state


@program
async def five_facts(s):
    s += "Write five facts about Paris.\n"
    async with s.fork(5) as forks:
        for i, f in enumerate(forks):
            f += f"Fact {i + 1}:" + gen("fact", stop="\n", max_tokens=24)
    forks.join()


async def check_fork_gather(backend: Backend) -> aiolm.ProgramState:
    state = await five_facts.run(backend=backend)
    facts = state["fact"]
    assert isinstance(facts, list) and len(facts) == 5
    assert all(isinstance(f, str) and "\n" not in f for f in facts)
    assert len(state.meta("fact")) == 5
    assert state.text() == "Write five facts about Paris.\n"  # gather merges no text
    return state


async def check_fork_concat(backend: Backend) -> aiolm.ProgramState:
    summaries: list[str] = []

    @program
    async def traced(s):
        s += "Summaries:\n"
        async with s.fork(3) as forks:
            forks += lambda i: f"Doc {i}: " + gen("summary", max_tokens=8, stop="\n") + "\n"
        forks.join(mode="concat")
        summaries.extend(f["summary"] for f in forks)
        s += "Overall:" + gen("overall", max_tokens=8, stop="\n")

    state = await traced.run(backend=backend)
    expected = "Summaries:\n" + "".join(f"Doc {i}: {t}\n" for i, t in enumerate(summaries))
    assert state.text() == expected + "Overall:" + state["overall"]
    assert "summary" not in state  # concat merges text, not variables
    return state


@program
async def describe_image(s, png: bytes):
    s += user(image(png) + "What is in the image?")
    s += assistant(gen("caption", max_tokens=16))


async def check_image(backend: Backend) -> aiolm.ProgramState | None:
    png = tiny_png()
    if not backend.capabilities.images:
        try:
            await describe_image.run(png, backend=backend)
        except UnsupportedFeature:
            return None
        raise AssertionError("an image on a backend without images must raise UnsupportedFeature")
    state = await describe_image.run(png, backend=backend)
    assert state.messages() == [
        {"role": "user", "content": [
            {"type": "image_url",
             "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
            {"type": "text", "text": "What is in the image?"},
        ]},
        {"role": "assistant", "content": state["caption"]},
    ]
    return state


@program
async def two_answers(s):
    s += "Q: What is the capital of France?\nA:" + gen("first", max_tokens=16, stop="\n")
    s += "\nQ: How many legs does a spider have?\nA: " + gen("second", max_tokens=8)
    s += "\n" + gen(max_tokens=4, stop="\n")


async def check_streaming(backend: Backend) -> tuple[aiolm.ProgramState, dict[str | None, str]]:
    deltas: dict[str | None, list[str]] = {}
    async with two_answers.stream(backend=backend) as events:
        async for ev in events:
            deltas.setdefault(ev.name, []).append(ev.text)
    state = events.state
    assert state is not None
    joined = {name: "".join(parts) for name, parts in deltas.items()}
    assert joined.get("first", "") == state["first"]
    assert joined.get("second", "") == state["second"]
    return state, joined


@program
async def scoped(s):
    s += "Start. "
    with s.var_scope("scoped"):
        s += "Inside " + gen("inner", max_tokens=4, stop="\n") + " done."
    s += " After."


async def check_var_scope(backend: Backend) -> aiolm.ProgramState:
    state = await scoped.run(backend=backend)
    assert state["scoped"] == "Inside " + state["inner"] + " done."
    assert state.text() == "Start. " + state["scoped"] + " After."
    return state


@program
async def square(s, x: int):
    if x == 2:
        raise ValueError("two is not allowed")
    s += f"Number {x}:" + gen("out", max_tokens=6, stop="\n")


async def check_run_batch(backend: Backend) -> list[aiolm.ProgramState]:
    states = await square.run_batch([{"x": x} for x in range(6)], backend=backend, max_concurrency=3)
    assert len(states) == 6
    for x, state in enumerate(states):
        if x == 2:
            assert isinstance(state.error, ValueError)
            continue
        assert state.error is None
        assert state.text() == f"Number {x}:" + state["out"]
    return states


def _task_names() -> list[str]:
    return sorted(t.name or "" for t in anyio.get_running_tasks())


async def _run_and_cancel(prog: aiolm.Program, backend: Backend, started: anyio.Event,
                          settle: float) -> anyio.CancelScope:
    """Run ``prog``; once it sets ``started``, let it generate ``settle`` s, then cancel it."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: prog.run(backend=backend))
            await started.wait()
            await anyio.sleep(settle)
            scope.cancel()
    return scope


async def check_cancel_queued(backend: Backend, *, settle: float = 0.05) -> dict[str, Any]:
    """Cancelling a run cancels its gen in flight and the gens queued behind it."""
    seen: dict[str, Any] = {}
    started = anyio.Event()

    @program
    async def long_then_queued(s):
        seen["state"] = s
        s += "Intro:" + gen("intro", max_tokens=300, ignore_eos=True)
        s += "\nNext:" + gen("queued", max_tokens=8)
        started.set()
        await s.sync()
        seen["finished"] = True

    before = _task_names()
    scope = await _run_and_cancel(long_then_queued, backend, started, settle)
    assert scope.cancelled_caught and "finished" not in seen
    state = seen["state"]
    for name in ("intro", "queued"):  # neither ever finished
        try:
            state[name]
        except VariableNotReady:
            pass
        else:
            raise AssertionError(f"{name} finished despite the cancellation")
    assert _task_names() == before, "a task outlived the cancelled program"
    return seen


async def check_cancel_fork(backend: Backend, *, settle: float = 0.05) -> dict[str, Any]:
    """Cancelling a run while its fork branches generate cancels every branch."""
    seen: dict[str, Any] = {}
    started = anyio.Event()

    @program
    async def slow_fork(s):
        s += "Tell three long stories.\n"
        async with s.fork(3) as forks:
            seen["forks"] = forks
            forks += lambda i: f"Branch {i}:" + gen("story", max_tokens=300, ignore_eos=True)
            started.set()
        seen["finished"] = True

    before = _task_names()
    scope = await _run_and_cancel(slow_fork, backend, started, settle)
    assert scope.cancelled_caught and "finished" not in seen
    for branch in seen["forks"]:
        try:
            branch["story"]
        except VariableNotReady:
            pass
        else:
            raise AssertionError("a branch finished despite the cancellation")
    assert _task_names() == before, "a task outlived the cancelled program"
    return seen


class FailingConstraint(Constraint):
    """A constraint that rejects itself when submitted (to make one fork branch fail)."""

    def compile(self, tokenizer: Any) -> Matcher:
        raise ConstraintError("conformance: failing branch")

    def matches_text(self, text: str) -> bool:
        return False

    def validate(self) -> None:
        raise ConstraintError("conformance: failing branch")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FailingConstraint)

    def __hash__(self) -> int:
        return hash(FailingConstraint)


async def check_fork_error(backend: Backend) -> dict[str, Any]:
    """An error in one branch cancels its siblings; ``run`` raises that error itself."""
    seen: dict[str, Any] = {}

    @program
    async def one_fails(s):
        s += "Three tasks.\n"
        async with s.fork(3) as forks:
            seen["forks"] = forks
            forks[0] += "Slow 0:" + gen("v", max_tokens=300, ignore_eos=True)
            forks[1] += "Fail:" + gen("v", constraint=FailingConstraint())
            forks[2] += "Slow 2:" + gen("v", max_tokens=300, ignore_eos=True)
        seen["finished"] = True

    before = _task_names()
    try:
        await one_fails.run(backend=backend)
    except ConstraintError as exc:
        assert "failing branch" in str(exc)
    else:
        raise AssertionError("run() must raise the failing branch's error")
    assert "finished" not in seen
    for i in (0, 2):
        try:
            seen["forks"][i]["v"]
        except VariableNotReady:
            pass
        else:
            raise AssertionError(f"sibling branch {i} was not cancelled")
    assert _task_names() == before, "a task outlived the failed program"
    return seen


#: Every check that takes only a backend (the engine helper reruns these on the Engine).
CHECKS = (
    check_few_shot_qa,
    check_multi_turn_chat,
    check_select,
    check_dtype_int,
    check_json_regex,
    check_react,
    check_tool_use,
    check_fork_gather,
    check_fork_concat,
    check_image,
    check_streaming,
    check_var_scope,
    check_run_batch,
    check_cancel_queued,
    check_cancel_fork,
    check_fork_error,
)

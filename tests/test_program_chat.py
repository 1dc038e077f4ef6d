"""Requests a program sends: chat messages for chat backends, clear UnsupportedFeature errors
for what a backend cannot do, one session per run."""

from __future__ import annotations

import pytest

from aiolm import UnsupportedFeature, assistant, gen, image, program, select, system, user
from aiolm.backends import Capabilities, ScriptedBackend

pytestmark = pytest.mark.anyio


class ChatScripted(ScriptedBackend):
    """The scripted model behind a chat-only API."""

    capabilities = Capabilities(chat_only=True, images=True)

    @property
    def chat_template(self):
        return None


class Limited(ScriptedBackend):
    """A text backend that can do none of the optional features."""

    capabilities = Capabilities(
        regex=False, json_schema=False, logprobs=False, images=False, score=False, token_ids=False
    )


class Sessions(ScriptedBackend):
    """Counts sessions: one new object per program run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sessions = []

    def new_session(self):
        self.sessions.append(object())
        return self.sessions[-1]


def appending(expr):
    async def body(s):
        s += expr

    return body


async def test_chat_backend_gets_finished_turns_and_the_open_assistant_turn():
    backend = ChatScripted(lambda p: " Paris.")
    state = await program(appending(
        system("Be brief.") + user("Capital of France?") + assistant("It is" + gen("city"))
    )).run(backend=backend)
    request = backend.requests[0]
    assert request.prompt is None
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "Be brief."), ("user", "Capital of France?"), ("assistant", "It is"),
    ]
    assert state["city"] == " Paris."
    assert state.messages()[-1] == {"role": "assistant", "content": "It is Paris."}


async def test_chat_backend_images_stay_in_their_turn():
    backend = ChatScripted(lambda p: "red")
    await program(appending(user(image(b"\x89PNG") + "Color?") + assistant(gen("c")))).run(backend=backend)
    turn = backend.requests[0].messages[0]
    assert turn.images[0].data == b"\x89PNG" and turn.content == "Color?"


async def test_chat_backend_select_scores_with_messages():
    backend = ChatScripted(lambda p: "no")
    state = await program(appending(user("Sure?") + assistant(select("a", ["yes", "no"])))).run(backend=backend)
    assert state["a"] == "no"


@pytest.mark.parametrize(
    ("expr", "match"),
    [
        (gen("x"), "inside an assistant turn"),
        (user("q") + gen("x"), "inside an assistant turn"),
        ("Loose text. " + assistant(gen("x")), "outside a turn"),
    ],
    ids=["no-turn", "user-turn", "stray-text"],
)
async def test_chat_backend_rejects_what_a_chat_api_cannot_express(expr, match):
    with pytest.raises(UnsupportedFeature, match=match):
        await program(appending(expr)).run(backend=ChatScripted())


@pytest.mark.parametrize(
    ("expr", "match"),
    [
        (gen("x", regex=r"\d+"), "Regex"),
        (gen("x", choices=["a", "b"]), "Choices"),
        (gen("x", dtype=int), "Regex"),
        (gen("x", json_schema={"type": "object"}), "JSON schema"),
        (gen("x", return_logprobs=True), "logprobs"),
        (user(image(b"\x89PNG")), "images"),
        (select("x", ["a", "b"]), r"gen\('x', choices"),
    ],
    ids=["regex", "choices", "dtype", "json_schema", "logprobs", "image", "select"],
)
async def test_unsupported_features_raise_before_calling_the_backend(expr, match):
    backend = Limited()
    with pytest.raises(UnsupportedFeature, match=match):
        await program(appending(expr)).run(backend=backend)
    assert backend.statistics().calls == 0 and backend.statistics().score_calls == 0


async def test_one_session_per_run_shared_by_every_request_of_the_run():
    backend = Sessions(lambda p: "a")

    @program
    async def forked(s):
        s += "p:" + gen("x") + select("y", ["a", "b"])
        async with s.fork(2) as forks:
            forks += gen("z")

    await forked.run(backend=backend)
    await forked.run(backend=backend)
    first, second = backend.sessions
    assert [r.session for r in backend.requests] == [first] * 3 + [second] * 3

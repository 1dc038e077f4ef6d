"""ProgramState semantics: enqueueing, waiting for variables, roles, scopes, errors."""

from __future__ import annotations

import base64

import anyio
import pytest

from aiolm import (
    ConstraintError,
    ProgramError,
    UnknownVariable,
    VariableNotReady,
    assistant,
    gen,
    image,
    program,
    select,
    system,
    user,
)
from aiolm.backends import ScriptedBackend

pytestmark = pytest.mark.anyio


def appending(expr):
    """A program body that appends ``expr``."""
    async def body(s):
        s += expr

    return body


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


async def run(body, backend=None, **kwargs):
    return await program(body).run(backend=backend or ScriptedBackend(), **kwargs)


async def test_text_is_applied_at_once_and_gen_is_only_enqueued():
    seen = {}

    async def body(s):
        s += "Hello"
        seen["text"] = s.text()
        s += " world:" + gen("x")
        seen["pending_text"] = s.text()
        with pytest.raises(VariableNotReady, match=r"await s\.get\('x'\)"):
            s["x"]
        seen["x"] = await s.get("x")
        seen["after"] = s.text()

    await run(body, ScriptedBackend(lambda p: "hi"))
    assert seen == {"text": "Hello", "pending_text": "Hello world:", "x": "hi", "after": "Hello world:hi"}


async def test_text_queued_behind_a_gen_keeps_its_order():
    seen = {}

    async def body(s):
        s += gen("x")
        s += " after"
        seen["before_sync"] = s.text()
        await s.sync()
        seen["after_sync"] = s.text()

    await run(body, ScriptedBackend(lambda p: "X"))
    assert seen == {"before_sync": "", "after_sync": "X after"}


async def test_get_waits_for_one_variable_only():
    backend = ScriptedBackend(lambda p: words(50) if p.endswith("long:") else "short", delay=0.005)
    seen = {}

    async def body(s):
        s += "a:" + gen("a") + " long:" + gen("b", max_tokens=100)
        seen["a"] = await s.get("a")
        seen["b_ready"] = "b" in s and not _ready(s, "b")
        await s.sync()
        seen["b"] = s["b"]

    await run(body, backend)
    assert seen == {"a": "short", "b_ready": True, "b": words(50)}


def _ready(s, name):
    try:
        s[name]
    except VariableNotReady:
        return False
    return True


async def test_a_name_enqueued_twice_is_ready_after_its_last_write():
    replies = iter(["first", "second"])
    seen = {}

    async def body(s):
        s += gen("x") + " " + gen("x")
        seen["x"] = await s.get("x")

    await run(body, ScriptedBackend(lambda p: next(replies)))
    assert seen["x"] == "second"


async def test_unknown_variables_raise_unknown_variable():
    async def body(s):
        with pytest.raises(UnknownVariable, match="nope"):
            s["nope"]
        with pytest.raises(UnknownVariable):
            await s.get("nope")
        with pytest.raises(UnknownVariable):
            s.meta("nope")

    await run(body)


async def test_meta_reports_finish_reason_tokens_and_logprobs():
    state = await run(
        appending("a b c:" + gen("x", max_tokens=2, return_logprobs=True)),
        ScriptedBackend(lambda p: "one two three"),
    )
    meta = state.meta("x")
    assert (meta.finish_reason, meta.prompt_tokens, meta.completion_tokens) == ("length", 3, 2)
    assert [lp.token for lp in meta.logprobs] == ["one", " two"]



async def test_meta_of_a_scope_variable_is_unknown():
    async def body(s):
        with s.var_scope("v"):
            s += "text"

    state = await run(body)
    assert state["v"] == "text"
    with pytest.raises(UnknownVariable, match="metadata"):
        state.meta("v")


async def test_var_scope_captures_content_without_role_markup():
    async def body(s):
        s += system("Sys")
        with s.var_scope("turns"):
            s += user("Q?") + assistant(gen("a"))
        s += user("next")

    state = await run(body, ScriptedBackend(lambda p: "A!"))
    assert state["turns"] == "Q?A!"
    assert state.text() == "SYSTEM: Sys\nUSER: Q?\nASSISTANT: A!\nUSER: next\n"


async def test_role_blocks_and_role_exprs_build_the_same_turns():
    async def with_blocks(s):
        with s.system():
            s += "S"
        with s.user():
            s += "U" + "!"
        with s.assistant():
            s += gen("a")

    async def with_exprs(s):
        s += system("S") + user("U!") + assistant(gen("a"))

    one = await run(with_blocks, ScriptedBackend(lambda p: "A"))
    two = await run(with_exprs, ScriptedBackend(lambda p: "A"))
    assert one.messages() == two.messages()
    assert one.text() == two.text() == "SYSTEM: S\nUSER: U!\nASSISTANT: A\n"


async def test_open_turn_shows_in_messages_and_text():
    seen = {}

    async def body(s):
        with s.user():
            s += "partial"
            seen["messages"] = s.messages()
            seen["text"] = s.text()

    await run(body)
    assert seen == {"messages": [{"role": "user", "content": "partial"}], "text": "USER: partial"}


async def test_turn_inside_a_turn_is_a_program_error():
    async def nested_block(s):
        with s.user(), pytest.raises(ProgramError, match="inside the open user turn"):
            s += assistant("x")
        with s.user(), pytest.raises(ProgramError, match="close the user turn"):
            with s.assistant():
                pass

    await run(nested_block)


async def test_image_outside_a_turn_is_a_program_error():
    async def body(s):
        with pytest.raises(ProgramError, match="inside a turn"):
            s += image(b"\x89PNG")

    await run(body)


async def test_appending_a_non_expr_is_a_type_error():
    async def body(s):
        with pytest.raises(TypeError, match="f-string"):
            s += 42

    await run(body)


async def test_state_rejects_appends_after_its_program_ended():
    state = await run(appending("x"))
    with pytest.raises(ProgramError, match="ended"):
        state += "more"
    assert state.text() == "x"


async def test_unnamed_gen_extends_text_only():
    state = await run(appending("A" + gen() + "B"), ScriptedBackend(lambda p: "-"))
    assert state.text() == "A-B"
    assert "None" not in repr(state)


async def test_gen_dtypes_parse_their_values():
    replies = {"i:": "-12", "f:": "3.25", "b:": "False", "s:": "7"}

    async def body(s):
        for key, dtype in (("i", int), ("f", float), ("b", bool), ("s", str)):
            s += f" {key}:" + gen(key, dtype=dtype)

    state = await run(body, ScriptedBackend(lambda p: replies[p.split()[-1]]))
    assert (state["i"], state["f"], state["b"], state["s"]) == (-12, 3.25, False, "7")


async def test_gen_choices_constrain_the_output():
    state = await run(
        appending("Color: " + gen("c", choices=["red", "blue"])),
        ScriptedBackend(lambda p: "blue"),
    )
    assert state["c"] == "blue"
    with pytest.raises(ConstraintError):
        await run(
            appending("Color: " + gen("c", choices=["red", "blue"])),
            ScriptedBackend(lambda p: "green"),
        )


async def test_gen_json_schema_from_a_pydantic_model():
    import pydantic

    class City(pydantic.BaseModel):
        name: str
        population: int

    state = await run(
        appending("JSON: " + gen("city", json_schema=City)),
        ScriptedBackend(lambda p: '{"name": "Paris", "population": 2}'),
    )
    assert City.model_validate_json(state["city"]).population == 2


async def test_select_appends_the_chosen_choice():
    state = await run(
        appending("Pick: " + select("p", ["apple", "banana"]) + "."),
        ScriptedBackend(lambda p: "banana split"),
    )
    assert (state["p"], state.text()) == ("banana", "Pick: banana.")


async def test_run_level_sampling_defaults_apply_to_every_gen_and_gen_overrides_them():
    backend = ScriptedBackend(lambda p: "x")
    await run(
        appending(gen("a") + gen("b", temperature=0.2)),
        backend, temperature=0.7, max_tokens=5,
    )
    a, b = (r.sampling for r in backend.requests)
    assert (a.temperature, a.max_tokens, b.temperature, b.max_tokens) == (0.7, 5, 0.2, 5)


async def test_program_error_propagates_unwrapped():
    async def body(s):
        s += gen("a")
        raise KeyError("mine")

    with pytest.raises(KeyError, match="mine"):
        await run(body)


async def test_backend_error_in_a_gen_propagates_unwrapped_and_cancels_the_body():
    reached = []

    def reply(prompt):
        raise RuntimeError("model exploded")

    async def body(s):
        s += gen("a")
        await anyio.sleep(5)
        reached.append(True)

    with pytest.raises(RuntimeError, match="model exploded"):
        await run(body, ScriptedBackend(reply))
    assert not reached


async def test_programs_compose_by_calling_one_on_a_state():
    @program
    async def ask(s, question):
        s += user(question) + assistant(gen("answer"))

    async def body(s):
        s += system("S")
        await ask(s, "Q1")

    state = await run(body, ScriptedBackend(lambda p: "A"))
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant"]


@pytest.mark.parametrize("kind", ["path", "data-url", "pil", "http"])
async def test_image_sources_load_into_image_data(kind, tmp_path):
    from PIL import Image as PILImage

    pil = PILImage.new("RGB", (1, 1), (255, 0, 0))
    path = tmp_path / "red.png"
    pil.save(path)
    png = path.read_bytes()
    source = {
        "path": path,
        "data-url": "data:image/png;base64," + base64.b64encode(png).decode(),
        "pil": pil,
        "http": "https://example.com/red.png",
    }[kind]
    state = await run(appending(user(image(source) + "?")))
    picture, text = state.messages()[0]["content"]
    assert text == {"type": "text", "text": "?"}
    url = picture["image_url"]["url"]
    if kind == "http":
        assert url == "https://example.com/red.png"
    else:
        prefix = "data:image/png;base64,"
        assert url.startswith(prefix)
        data = base64.b64decode(url.removeprefix(prefix))
        assert PILImage.open(__import__("io").BytesIO(data)).getpixel((0, 0)) == (255, 0, 0)


async def test_missing_image_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        await run(appending(user(image(tmp_path / "missing.png"))))


async def test_variables_of_a_failed_program_report_they_never_finished():
    @program
    async def failing(s):
        s += gen("a", max_tokens=50)
        await anyio.sleep(0.01)
        raise RuntimeError("stop here")

    backend = ScriptedBackend(lambda p: words(50), delay=0.01)
    [state] = await failing.run_batch([{}], backend=backend)
    assert isinstance(state.error, RuntimeError)
    with pytest.raises(VariableNotReady, match="never finished"):
        state["a"]
    with pytest.raises(VariableNotReady, match="never finished"):
        await state.get("a")
    with pytest.raises(ProgramError, match="cancelled"):
        await state.sync()

"""Tool-call parsers: each format read whole and streamed in any pieces, malformed calls
kept as content, the grammars that force calls (compiled, and sampled from a random-weight
model), the tool descriptions, and detection from chat templates."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
from chat_templates import THINKING_TEMPLATE, TOOLS_TEMPLATE
from hypothesis import given, settings
from hypothesis import strategies as st

import aiolm
from aiolm.constraints import Grammar
from aiolm.tools import Tool, ToolCall, ToolCallDelta, assemble_tool_calls, new_call_id
from aiolm.tools.parsers import (
    TOOL_PARSERS,
    ParsedOutput,
    StreamPiece,
    ToolParser,
    ToolStreamer,
    detect_tool_parser,
    get_tool_parser,
)

WEATHER = Tool(name="get_weather", description="The weather in a city.", parameters={
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7},
                   "unit": {"enum": ["C", "F"]}},
    "required": ["city"],
    "additionalProperties": False,
})
PING = Tool(name="ping", parameters={
    "type": "object", "properties": {"loud": {"type": "boolean"}}, "additionalProperties": False,
})
ADD = Tool(name="add", parameters={
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                   "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"],
    "additionalProperties": False,
})
TOOLS = [WEATHER, PING, ADD]

# (format, output, expected content, expected calls as (name, arguments))
WELL_FORMED = [
    ("hermes",
     'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
     '"days": 2}}\n</tool_call>\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>\n',
     "Let me look.\n", [("get_weather", {"city": "Paris", "days": 2}), ("ping", {})]),
    ("hermes",
     '<tool_call>{"arguments": {"s": "a}\\"<tool_call>"}, "name": "f"}</tool_call> Done.',
     " Done.", [("f", {"s": 'a}"<tool_call>'})]),
    ("hermes", "No calls here, <tool> is not a marker.", "No calls here, <tool> is not a marker.",
     []),
    ("llama3_json",
     '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
     '{"name": "ping", "arguments": {"loud": true}}\n',
     "", [("add", {"a": 1, "b": 2}), ("ping", {"loud": True})]),
    ("llama3_json", '  {"name": "add", "parameters": {"a": 1, "b": 2}}\n{"name": "ping", '
     '"parameters": {}}', "", [("add", {"a": 1, "b": 2}), ("ping", {})]),
    ("llama3_json", "The answer is 4.", "The answer is 4.", []),
    ("mistral",
     'Sure. [TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": [2, {"c": "]"}]}, '
     '"id": "abcDEF123"}, {"name": "ping", "arguments": {}}]',
     "Sure. ", [("add", {"a": 1, "b": [2, {"c": "]"}]}), ("ping", {})]),
    ("mistral", "[TOOL_CALLS][{\"name\": \"ping\", \"arguments\": {}}]\n\n", "",
     [("ping", {})]),
    ("pythonic", '[get_weather(city="Paris", days=2), ping(), add(a=1, b=2,)]', "",
     [("get_weather", {"city": "Paris", "days": 2}), ("ping", {}), ("add", {"a": 1, "b": 2})]),
    ("pythonic", "[f(x=True, y=None, z=(1, 2), w={'k': [1.5, -2]}, v=true, u='it\\'s')]", "",
     [("f", {"x": True, "y": None, "z": [1, 2], "w": {"k": [1.5, -2]}, "v": True,
             "u": "it's"})]),
    ("pythonic", "Just text [1] with a bracket.", "Just text [1] with a bracket.", []),
]

# (format, output, expected content, expected call names): malformed calls are content
MALFORMED = [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": tru}}\n</tool_call> after',
     '<tool_call>\n{"name": "f", "arguments": {"a": tru}}\n</tool_call> after', []),
    ("hermes", '<tool_call>\nnot json\n</tool_call>x<tool_call>{"name": "g", "arguments": {}}'
     "</tool_call>", "<tool_call>\nnot json\n</tool_call>x", ["g"]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}\n</tool_call>!',
     '<tool_call>{"name": "f", "arguments": {"a": 1}\n</tool_call>!', []),
    ("hermes", '<tool_call>{"name": "f", "arguments": "a=1"}</tool_call>',
     '<tool_call>{"name": "f", "arguments": "a=1"}</tool_call>', []),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}}',
     '<tool_call>{"name": "f", "arguments": {"a": 1}}', []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", '{"name": "f", "parameters": {}} and then some words',
     " and then some words", ["f"]),
    ("llama3_json", '{"name": "f", "parameters": [1]}', '{"name": "f", "parameters": [1]}', []),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": 3}]',
     '[TOOL_CALLS] [{"name": "f", "arguments": 3}]', []),
    ("mistral", "[TOOL_CALLS] []", "[TOOL_CALLS] []", []),
    ("mistral", '[TOOL_CALLS] {"name": "f"}', '[TOOL_CALLS] {"name": "f"}', []),
    ("pythonic", "[1, 2]", "[1, 2]", []),
    ("pythonic", "[f(a=x)]", "[f(a=x)]", []),
    ("pythonic", "[f(a=__import__('os').system('true'))]",
     "[f(a=__import__('os').system('true'))]", []),
    ("pythonic", "[f(1, 2)]", "[f(1, 2)]", []),
    ("pythonic", "[f(a={1, 2})]", "[f(a={1, 2})]", []),
    ("pythonic", "[f(a=1)", "[f(a=1)", []),
    ("pythonic", "[]", "[]", []),
]


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.name, dict(c.arguments)) for c in calls]


def _stream(parser: ToolParser, text: str,
            sizes: list[int]) -> tuple[str, list[ToolCallDelta], ToolStreamer]:
    """Feed ``text`` in pieces of the given sizes (cycled); the content, deltas, streamer."""
    streamer = parser.streamer()
    content, deltas, i, k = [], [], 0, 0
    while i < len(text):
        size = sizes[k % len(sizes)]
        piece = streamer.feed(text[i:i + size])
        content.append(piece.content)
        deltas.extend(piece.calls)
        i, k = i + size, k + 1
    tail = streamer.finish()
    content.append(tail.content)
    deltas.extend(tail.calls)
    return "".join(content), deltas, streamer


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), WELL_FORMED)
def test_parse_splits_content_and_calls(fmt, text, content, calls):
    out = get_tool_parser(fmt).parse(text)
    assert isinstance(out, ParsedOutput)
    assert out.content == content
    assert _calls(out.calls) == calls
    assert all(c.id.startswith("call_") or c.id == "abcDEF123" for c in out.calls)
    assert len({c.id for c in out.calls}) == len(out.calls)


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), WELL_FORMED)
def test_streaming_in_random_pieces_gives_the_calls_and_content_of_the_whole(fmt, text,
                                                                            content, calls):
    parser = get_tool_parser(fmt)
    for seed in range(40):
        rng = random.Random(seed)
        sizes = [rng.randint(1, 7) for _ in range(50)]
        streamed, deltas, _ = _stream(parser, text, sizes)
        assert streamed == content
        assert _calls(assemble_tool_calls(deltas)) == calls
        assert sorted({d.index for d in deltas}) == list(range(len(calls)))


@pytest.mark.parametrize(("fmt", "text", "content", "names"), MALFORMED)
def test_malformed_calls_come_back_as_content(fmt, text, content, names):
    parser = get_tool_parser(fmt)
    out = parser.parse(text)
    assert out.content == content
    assert [c.name for c in out.calls] == names
    for size in (1, 2, 3, 5, 11):
        streamed, _, streamer = _stream(parser, text, [size])
        assert streamed == content
        assert [c.name for c in streamer.calls] == names


def test_mistral_keeps_the_calls_own_id():
    out = get_tool_parser("mistral").parse(
        '[TOOL_CALLS] [{"name": "ping", "arguments": {}, "id": "abcDEF123"}, '
        '{"name": "ping", "arguments": {}}]')
    assert out.calls[0].id == "abcDEF123"
    assert out.calls[1].id.startswith("call_")


def test_hermes_streams_the_name_then_the_arguments_as_they_grow():
    streamer = get_tool_parser("hermes").streamer()
    assert streamer.feed("Checking.\n<tool") == StreamPiece(content="Checking.\n")
    piece = streamer.feed('_call>\n{"name": "get_weather", "arguments": {"ci')
    assert piece.content == ""
    (head, first) = piece.calls
    assert (head.index, head.name, head.arguments) == (0, "get_weather", "")
    assert head.id.startswith("call_")
    assert first == ToolCallDelta(index=0, arguments='{"ci')
    assert streamer.feed('ty": "Oslo"}').calls == (ToolCallDelta(index=0, arguments='ty": "Oslo"}'),)
    assert streamer.feed("}\n</tool_call>") == StreamPiece()
    assert streamer.finish() == StreamPiece()
    assert _calls(streamer.calls) == [("get_weather", {"city": "Oslo"})]


def test_argument_fragments_join_to_the_exact_json_text():
    args = '{"a": [1, 2, {"b": "}]\\"x"}],   "c" : null}'
    text = f'[TOOL_CALLS] [{{"name": "f", "arguments": {args}}}]'
    for size in (1, 3, 8):
        _, deltas, _ = _stream(get_tool_parser("mistral"), text, [size])
        assert "".join(d.arguments for d in deltas) == args


def test_text_that_may_begin_a_marker_is_held_back_until_decided():
    streamer = get_tool_parser("hermes").streamer()
    assert streamer.feed("a <tool_").content == "a "
    assert streamer.feed("box> b").content == "<tool_box> b"
    streamer = get_tool_parser("mistral").streamer()
    assert streamer.feed("x [TOOL").content == "x "
    assert streamer.finish().content == "[TOOL"


def test_whitespace_between_and_after_calls_is_dropped_but_text_after_them_kept():
    parser = get_tool_parser("hermes")
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert parser.parse(f"{call}\n\n{call}\n").content == ""
    assert parser.parse(f"{call}\nBye.").content == "\nBye."


def test_pythonic_calls_are_sent_whole_when_each_ends():
    streamer = get_tool_parser("pythonic").streamer()
    assert streamer.feed('[add(a=1, b=2), ping(lo').calls[0].arguments == '{"a": 1, "b": 2}'
    last = streamer.feed("ud=False)]").calls
    assert [(d.index, d.name, d.arguments) for d in last] == [(1, "ping", '{"loud": false}')]


_PIECES = st.sampled_from([
    "<tool_call>", "</tool_call>", "<tool_", "[TOOL_CALLS]", "<|python_tag|>", '{"name": "f", ',
    '"arguments": ', '"parameters": ', "{", "}", "[", "]", "(", ")", '"', "'", "\\", ",", ";",
    " ", "\n", "1", "true", "f(", "a=", "x", '"id": "abc"', "<", ">",
])


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(_PIECES, max_size=30), cuts=st.lists(st.integers(1, 9), min_size=1),
       fmt=st.sampled_from(sorted(TOOL_PARSERS)))
def test_any_text_streams_as_it_parses_and_never_raises(pieces, cuts, fmt):
    text = "".join(pieces)
    parser = get_tool_parser(fmt)
    whole = parser.parse(text)
    streamed, _, streamer = _stream(parser, text, cuts)
    assert streamed == whole.content
    assert _calls(streamer.calls) == _calls(whole.calls)


def test_a_finished_streamer_refuses_more_text():
    streamer = get_tool_parser("hermes").streamer()
    streamer.finish()
    with pytest.raises(RuntimeError, match="finished"):
        streamer.feed("x")
    with pytest.raises(TypeError, match="delta"):
        get_tool_parser("hermes").streamer().feed(b"x")  # type: ignore[arg-type]


# ------------------------------------------------------------------ grammars


def _written(fmt: str, calls: list[tuple[str, dict]]) -> str:
    return get_tool_parser(fmt).format_calls(
        [ToolCall(id=new_call_id(), name=n, arguments=a) for n, a in calls])


@pytest.mark.parametrize("fmt", sorted(TOOL_PARSERS))
def test_formatted_calls_parse_back(fmt):
    calls = [("get_weather", {"city": "Zürich \"centre\"", "days": 2}), ("ping", {}),
             ("add", {"a": 1, "b": [True, None, {"x": 1.5}]})]
    text = _written(fmt, calls)
    assert _calls(get_tool_parser(fmt).parse(text).calls) == calls
    assert _written(fmt, []) == ""


@pytest.mark.parametrize("fmt", sorted(TOOL_PARSERS))
def test_grammar_accepts_valid_calls_in_the_format_and_nothing_else(fmt):
    parser = get_tool_parser(fmt)
    one = [("get_weather", {"city": "Oslo", "days": 3})]
    two = [("add", {"a": 1, "b": 2}), ("ping", {})]
    required = Grammar(parser.grammar(TOOLS, choice="required", parallel=False))
    parallel = Grammar(parser.grammar(TOOLS, choice="required", parallel=True))
    named = Grammar(parser.grammar(TOOLS, choice="add", parallel=False))
    for g in (required, parallel, named):
        g.validate()
    assert required.matches_text(_written(fmt, one))
    assert not required.matches_text(_written(fmt, two))
    assert parallel.matches_text(_written(fmt, two))
    assert named.matches_text(_written(fmt, two[:1]))
    assert not named.matches_text(_written(fmt, one))
    assert not required.matches_text(_written(fmt, [("get_weather", {"city": "Oslo",
                                                                       "days": 9})]))
    assert not required.matches_text(_written(fmt, [("get_weather", {"days": 3})]))
    assert not required.matches_text(_written(fmt, [("nope", {})]))
    assert _calls(parser.parse(_written(fmt, two)).calls) == two


def test_pythonic_grammar_takes_optional_arguments_in_order():
    g = Grammar(get_tool_parser("pythonic").grammar([PING, WEATHER], choice="required",
                                                    parallel=False))
    for text in ("[ping()]", "[ping(loud=true)]", '[get_weather(city="a")]',
                 '[get_weather(city="a", unit="F")]', '[get_weather(city="a", days=2, unit="C")]'):
        assert g.matches_text(text), text
    for text in ("[ping(loud=1)]", '[get_weather(unit="F")]', '[get_weather(city="a", )]',
                 '[get_weather(days=2, city="a")]'):
        assert not g.matches_text(text), text


def test_grammar_refuses_choices_without_a_grammar():
    parser = get_tool_parser("hermes")
    with pytest.raises(ValueError, match="auto"):
        parser.grammar(TOOLS, choice="auto", parallel=False)
    with pytest.raises(ValueError, match="no tool named 'nope'"):
        parser.grammar(TOOLS, choice="nope", parallel=False)
    with pytest.raises(ValueError, match="at least one tool"):
        parser.grammar([], choice="required", parallel=False)
    odd = Tool(name="f", parameters={"type": "object", "properties": {"class": {}}})
    with pytest.raises(ValueError, match="not a Python identifier"):
        get_tool_parser("pythonic").grammar([odd], choice="required", parallel=False)


def test_schema_layout_of_its_own_is_kept():
    loose = Tool(name="f", parameters={"type": "object", "properties": {"a": {"type": "integer"}},
                                       "required": ["a"],
                                       "x-guidance": {"whitespace_flexible": True}})
    g = Grammar(get_tool_parser("llama3_json").grammar([loose], choice="f", parallel=False))
    assert g.matches_text('{"name": "f", "parameters": {  "a":1 }}')


def _tiny_engine() -> aiolm.Engine:
    from tiny_chat import tiny_chat_model

    return aiolm.Engine(tiny_chat_model(), max_total_tokens=2048)


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", sorted(TOOL_PARSERS))
async def test_random_weights_under_the_grammar_make_valid_calls(fmt):
    parser = get_tool_parser(fmt)
    schemas = {t.name: t.parameters for t in TOOLS}
    async with _tiny_engine() as engine:
        for seed, choice, parallel in [(0, "required", False), (1, "required", False),
                                       (2, "get_weather", False), (3, "required", True),
                                       (4, "add", True)]:
            grammar = Grammar(parser.grammar(TOOLS, choice=choice, parallel=parallel))
            done = await engine.generate("Call a tool.", max_tokens=300, constraint=grammar,
                                         temperature=1.0, seed=seed)
            assert done.finish_reason == "stop", done.text
            out = parser.parse(done.text)
            assert out.content == ""
            assert len(out.calls) >= 1 and (parallel or len(out.calls) == 1), done.text
            for call in out.calls:
                assert choice == "required" or call.name == choice
                jsonschema.validate(dict(call.arguments), schemas[call.name])


# ------------------------------------------------------------------ descriptions, detection


@pytest.mark.parametrize("fmt", sorted(TOOL_PARSERS))
def test_describe_tools_lists_every_tool_and_the_format(fmt):
    text = get_tool_parser(fmt).describe_tools(TOOLS)
    for tool in TOOLS:
        assert json.dumps(tool.to_openai()) in text
    cue = {"hermes": "<tool_call>", "llama3_json": '"parameters"', "mistral": "[TOOL_CALLS]",
           "pythonic": "func_name1("}[fmt]
    assert cue in text


def test_detect_tool_parser_from_template_text():
    assert detect_tool_parser(TOOLS_TEMPLATE) == "hermes"
    assert detect_tool_parser(THINKING_TEMPLATE) == "hermes"
    assert detect_tool_parser("{{ '[AVAILABLE_TOOLS]' }}...{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_tool_parser("{%- if message.role == 'ipython' %}") == "llama3_json"
    assert detect_tool_parser("{{- '<|python_tag|>' + tool_call.name }}") == "llama3_json"
    assert detect_tool_parser("respond as [func_name1(params_name1=params_value1)]") == "pythonic"
    assert detect_tool_parser("{{ '<|im_start|>' + message.content }}") is None
    assert detect_tool_parser(None) is None


def test_get_tool_parser_names_the_known_formats():
    assert {n: type(get_tool_parser(n)) for n in TOOL_PARSERS} == TOOL_PARSERS
    assert all(get_tool_parser(n).name == n for n in TOOL_PARSERS)
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, pythonic"):
        get_tool_parser("qwen")

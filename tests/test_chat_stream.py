"""``plan_chat``: how a chat with tools is rendered for a text backend, by kind of template."""

from __future__ import annotations

import pytest
from chat_templates import TOOLS_TEMPLATE
from tiny_chat import tiny_chat_model

from aiolm import Engine
from aiolm.backends.base import GenerateRequest
from aiolm.chat import Message, TextPart
from aiolm.tools import ToolCall, as_tools, plan_chat

pytestmark = pytest.mark.anyio

TOOLS = as_tools([{"name": "get_weather", "description": "The weather in a city.",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                  "required": ["city"]}}])


def text(role: str, body: str) -> Message:
    return Message(role=role, parts=(TextPart(text=body),))


CALL = ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris"})
HISTORY = (text("user", "Weather in Paris?"),
           Message(role="assistant", tool_calls=(CALL,)),
           Message(role="tool", parts=(TextPart(text="sunny, 21 C"),), tool_call_id="call_1"),
           Message(role="assistant"))


async def plan(template: str | None, messages=HISTORY, **kw) -> str:
    async with Engine(tiny_chat_model(template), max_total_tokens=1024) as engine:
        request = GenerateRequest(messages=messages, tools=TOOLS, **kw)
        return str(plan_chat(engine, request).request.prompt)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_template_that_renders_tools_renders_them_itself():
    prompt = await plan(TOOLS_TEMPLATE)
    assert "# Tools" in prompt and '"name": "get_weather"' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_template_that_ignores_tools_gets_them_described_in_the_system_turn():
    # SmolLM2's own template has no tools: rendered as it is, the model would never see them.
    prompt = await plan(None)
    assert prompt.startswith("<|im_start|>system\n")
    assert "get_weather" in prompt.split("<|im_end|>")[0]       # in the system turn
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_existing_system_turn_keeps_its_text_before_the_tools():
    messages = (text("system", "Be brief."), *HISTORY)
    prompt = await plan(None, messages=messages)
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n") and "get_weather" in system


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_format_whose_marker_is_a_special_token_keeps_special_tokens_in_the_text():
    async with Engine(tiny_chat_model(TOOLS_TEMPLATE), max_total_tokens=1024) as engine:
        for parser, skip in (("mistral", False), ("hermes", True)):
            request = GenerateRequest(messages=HISTORY, tools=TOOLS)
            planned = plan_chat(engine, request, tool_parser=parser).request
            assert planned.sampling.skip_special_tokens is skip


async def test_skip_special_tokens_false_writes_special_tokens_into_the_text():
    async with Engine(tiny_chat_model(), max_total_tokens=1024) as engine:
        im_start = engine.tokenizer.encode("<|im_start|>")
        assert len(im_start) == 1
        forced = {"max_tokens": 3, "ignore_eos": True, "logit_bias": {im_start[0]: 100}}
        kept = await engine.generate("Hi", skip_special_tokens=False, **forced)
        dropped = await engine.generate("Hi", **forced)
    assert kept.text == "<|im_start|>" * 3 and dropped.text == ""
    assert kept.token_ids == dropped.token_ids == (im_start[0],) * 3

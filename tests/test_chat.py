"""Chat rendering: templates derived from a model's renderer, text for text backends,
messages for chat backends."""

from __future__ import annotations

import base64

import pytest

from aiolm.backends import ImageData
from aiolm.chat import (
    SIMPLE_TEMPLATE,
    ChatTemplate,
    ImagePart,
    Message,
    TextPart,
    messages_to_openai,
    render_conversation,
    render_text,
)

SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """SmolLM2-Instruct's chat template (chatml with a default system prompt), in Python."""
    out = []
    for i, m in enumerate(messages):
        if i == 0 and m["role"] != "system":
            out.append(f"<|im_start|>system\n{SMOL_DEFAULT}<|im_end|>\n")
        out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def llama3(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """Llama-3-Instruct's template shape: a BOS, role headers, <|eot_id|> after each turn."""
    out = ["<|begin_of_text|>"]
    for m in messages:
        out.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>")
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def derive(renderer) -> ChatTemplate:
    """The template derived from ``renderer`` (its BOS is Llama-3's, as its tokenizer says)."""
    return ChatTemplate.from_renderer(renderer.__name__, renderer, bos_token="<|begin_of_text|>")


def msg(role: str, text: str) -> Message:
    return Message(role=role, parts=(TextPart(text=text),))


CONVERSATIONS = [
    [msg("user", "Hi")],
    [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Bye")],
    [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "2+2?")],
]


@pytest.mark.parametrize("renderer", [chatml, llama3], ids=["chatml", "llama3"])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one", "system", "multi"])
def test_template_from_renderer_reproduces_the_model_template(renderer, conversation):
    template = derive(renderer)
    as_dicts = [{"role": m.role, "content": m.content} for m in conversation]
    assert render_text(conversation, template) == renderer(as_dicts, False)
    assert render_text(conversation, template, open_role="assistant") == renderer(as_dicts, True)


def test_template_from_renderer_finds_the_default_system_prompt():
    assert derive(chatml).default_system == SMOL_DEFAULT
    template = derive(llama3)
    assert template.default_system is None and template.bos == "<|begin_of_text|>"


def test_template_requires_every_role():
    with pytest.raises(ValueError, match="assistant"):
        ChatTemplate(name="bad", prefix={"system": "", "user": ""}, suffix={"system": "", "user": ""})


@pytest.mark.parametrize("renderer", [chatml, llama3], ids=["chatml", "llama3"])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one", "system", "multi"])
def test_render_conversation_of_turns_equals_render_text(renderer, conversation):
    template = derive(renderer)
    assert render_conversation(conversation, template) == render_text(conversation, template)
    assert render_conversation(
        conversation, template, open_role="assistant", open_text="Sure"
    ) == render_text(conversation, template, open_role="assistant", open_text="Sure")


def test_render_conversation_of_plain_text_is_the_concatenation():
    template = derive(llama3)
    assert render_conversation(["Q: 1+1?\n", "A: 2"], template) == "Q: 1+1?\nA: 2"
    assert render_conversation([], template) == ""


def test_render_conversation_keeps_plain_text_where_it_stands():
    template = derive(chatml)
    text = render_conversation(["Preamble. "], template, open_role="user", open_text="Hi")
    assert text == f"Preamble. <|im_start|>system\n{SMOL_DEFAULT}<|im_end|>\n<|im_start|>user\nHi"
    between = render_conversation([msg("system", "S"), "--", msg("user", "U")], SIMPLE_TEMPLATE)
    assert between == "SYSTEM: S\n--USER: U\n"


def test_images_render_as_the_image_token_in_text():
    png = ImageData(data=b"\x89PNG", mime="image/png")
    turn = Message(role="user", parts=(ImagePart(image=png), TextPart(text="What?")))
    assert render_text([turn], SIMPLE_TEMPLATE) == "USER: <image>What?\n"
    assert turn.content == "What?" and turn.images == (png,)


def test_messages_to_openai_sends_images_as_data_urls():
    png = ImageData(data=b"\x89PNG", mime="image/png")
    url = ImageData(url="https://example.com/cat.jpg")
    wire = messages_to_openai([
        msg("system", "Be brief."),
        Message(role="user", parts=(TextPart(text="Compare"), ImagePart(image=png), ImagePart(image=url))),
    ])
    assert wire[0] == {"role": "system", "content": "Be brief."}
    assert wire[1]["content"] == [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]

"""Reasoning: the thinking parsers (whole and streamed), their detection from chat templates,
and the ThinkingBudget constraint, driven by hand on SmolLM2's tokenizer and through the
engine on a tiny random-weight model."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import smollm2
from chat_templates import THINKING_TEMPLATE, TOOLS_TEMPLATE
from hypothesis import given, settings
from hypothesis import strategies as st

import aiolm
from aiolm.constraints import JSONSchema, Regex, ThinkingBudget
from aiolm.tools.reasoning import (
    REASONING_PARSERS,
    detect_reasoning_parser,
    get_reasoning_parser,
    template_has_thinking_switch,
)

QWEN3 = get_reasoning_parser("qwen3")
R1 = get_reasoning_parser("deepseek_r1")


@pytest.mark.parametrize(("parser", "text", "reasoning", "content"), [
    (QWEN3, "<think>\nLet me see.\n</think>\n\nIt is 4.", "\nLet me see.\n", "It is 4."),
    (QWEN3, "\n<think>a</think>b", "a", "b"),
    (QWEN3, "It is 4.", "", "It is 4."),
    (QWEN3, "It is 4. </think> really", "", "It is 4. </think> really"),
    (QWEN3, "<think>cut off by the length lim", "cut off by the length lim", ""),
    (QWEN3, "<think></think>", "", ""),
    (QWEN3, "<thin", "", "<thin"),
    (R1, "Let me see.\n</think>\n\nIt is 4.", "Let me see.\n", "It is 4."),
    (R1, "<think>\nhmm</think>ok", "\nhmm", "ok"),
    (R1, "still thinking when it stopped", "still thinking when it stopped", ""),
    (R1, "a </thi", "a </thi", ""),
])
def test_parse_splits_reasoning_from_content(parser, text, reasoning, content):
    assert parser.parse(text) == (reasoning, content)


_PIECES = st.sampled_from(["<think>", "</think>", "<th", "</", "ink>", "\n", " ", "a", "b c"])


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(_PIECES, max_size=20), cuts=st.lists(st.integers(1, 6), min_size=1),
       name=st.sampled_from(sorted(REASONING_PARSERS)))
def test_streaming_in_any_pieces_splits_as_the_whole(pieces, cuts, name):
    parser = get_reasoning_parser(name)
    text = "".join(pieces)
    streamer = parser.streamer()
    reasoning, content, i, k = [], [], 0, 0
    while i < len(text):
        r, c = streamer.feed(text[i:i + cuts[k % len(cuts)]])
        reasoning.append(r)
        content.append(c)
        i, k = i + cuts[k % len(cuts)], k + 1
    r, c = streamer.finish()
    assert ("".join(reasoning) + r, "".join(content) + c) == parser.parse(text)


def test_streamer_holds_back_only_a_possible_marker():
    streamer = QWEN3.streamer()
    assert streamer.feed("<thi") == ("", "")
    assert streamer.feed("nk>Hmm </th") == ("Hmm ", "")
    assert streamer.feed("ink>\n") == ("", "")
    assert streamer.feed("\nYes") == ("", "Yes")
    assert streamer.finish() == ("", "")


def test_detect_reasoning_parser_from_template_text():
    assert detect_reasoning_parser(THINKING_TEMPLATE) == "qwen3"
    r1 = ("{% for m in messages %}{{ m.content }}{% endfor %}"
          "{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")
    assert detect_reasoning_parser(r1) == "deepseek_r1"
    qwq = "{%- if add_generation_prompt %}\n{{- '<|im_start|>assistant\\n<think>\\n' }}\n{%- endif %}"
    assert detect_reasoning_parser(qwq) == "deepseek_r1"
    assert detect_reasoning_parser(TOOLS_TEMPLATE) is None
    assert detect_reasoning_parser(None) is None
    assert template_has_thinking_switch(THINKING_TEMPLATE)
    assert not template_has_thinking_switch(TOOLS_TEMPLATE)
    assert not template_has_thinking_switch(None)


def test_get_reasoning_parser_names_the_known_formats():
    assert QWEN3.start == "<think>" and QWEN3.end == "</think>" and not QWEN3.starts_inside
    assert R1.starts_inside
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        get_reasoning_parser("o1")


# ------------------------------------------------------------------ ThinkingBudget by hand

def _tok():
    return smollm2.tokenizer()


def _allowed(matcher) -> np.ndarray:
    row = np.zeros((len(_tok().hf) + 31) // 32, dtype=np.int32)
    matcher.fill_next_token_mask(row)
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))


def _advance(matcher, ids) -> None:
    for t in ids:
        assert matcher.advance(t), t


def test_start_is_forced_then_thinking_is_free_but_for_eos():
    tok = _tok()
    m = ThinkingBudget(inner=Regex(r"[0-9]+"), start="<think>").compile(tok)
    start = tok.encode("<think>")
    assert len(start) > 1
    assert m.forced_tokens() == start
    assert list(_allowed(m)) == start[:1]
    assert not m.advance(start[1])
    _advance(m, start)
    allowed = _allowed(m)
    assert len(allowed) == len(tok.hf) - 1 and 2 not in allowed  # all but EOS (<|im_end|>)
    assert m.forced_tokens() == [] and not m.accepts_eos() and not m.advance(2)


def test_the_budget_forces_the_end_then_the_answer_follows_its_constraint():
    tok = _tok()
    m = ThinkingBudget(inner=Regex(r"[0-9]+"), start="<think>", max_thinking_tokens=3).compile(tok)
    _advance(m, tok.encode("<think>"))
    thoughts = tok.encode(" one two three")
    assert len(thoughts) == 3
    _advance(m, thoughts[:2])
    assert m.forced_tokens() == []
    _advance(m, thoughts[2:])
    forced = tok.encode("</think>\n\n")
    assert m.forced_tokens() == forced
    assert list(_allowed(m)) == forced[:1]
    rollback, tokens = m.jump_forward()
    assert (rollback, tokens) == (0, forced)
    _advance(m, forced)
    digits = {t for t in range(len(tok.hf)) if tok.decode([t]).isdigit() and
              tok.decode([t]).isascii()}
    assert set(_allowed(m)) == digits
    assert not m.accepts_eos()
    _advance(m, tok.encode("42"))
    assert m.accepts_eos() and not m.is_finished()


def test_a_natural_end_of_several_tokens_hands_over_to_the_answer():
    tok = _tok()
    spec = ThinkingBudget(inner=JSONSchema({"type": "object", "properties": {"a": {"type": "integer"}},
                                            "required": ["a"]}), max_thinking_tokens=50)
    m = spec.compile(tok)
    _advance(m, tok.encode("I think so.</think>"))
    assert len(tok.encode("</think>")) == 3
    assert tok.decode(m.forced_tokens()) == '{"a":'  # the inner matcher's forced text
    _advance(m, tok.encode('{"a": 7}'))
    assert m.accepts_eos()


def test_a_token_that_would_run_past_the_end_into_the_answer_is_masked():
    tok = _tok()
    m = ThinkingBudget(inner=Regex(r"[0-9]+")).compile(tok)
    _advance(m, tok.encode("Done.</think"))
    allowed = set(_allowed(m))
    close, run_on = tok.hf.convert_tokens_to_ids([">", ">,"])
    assert close in allowed and run_on not in allowed
    assert not m.advance(run_on)
    _advance(m, [close])
    assert not m.advance(tok.encode("x")[0])
    _advance(m, tok.encode("12"))


def test_whitespace_after_a_natural_end_is_not_the_answers():
    tok = _tok()
    m = ThinkingBudget(inner=Regex(r"[0-9]+"), end="</think>\n").compile(tok)
    _advance(m, tok.encode("Done.</think>"))
    blank = tok.encode("\n\n")
    assert len(blank) == 1 and blank[0] in _allowed(m)
    _advance(m, blank)  # ends the thinking; its second newline is not given to the answer
    assert not m.accepts_eos()
    _advance(m, tok.encode("7"))
    assert m.accepts_eos()


def test_rollback_undoes_exactly_and_fork_is_independent():
    tok = _tok()
    spec = ThinkingBudget(inner=Regex(r"[0-9]{1,6}"), start="<think>", max_thinking_tokens=4)
    m = spec.compile(tok)
    path = (tok.encode("<think>") + tok.encode(" a b c d") + tok.encode("</think>\n\n")
            + tok.encode("123"))
    seen = []  # the matcher's view before each token of the path
    for t in path:
        seen.append((list(_allowed(m)), m.forced_tokens(), m.accepts_eos()))
        _advance(m, [t])
    twin = m.fork()
    at = len(path)
    for n in (2, 5, 4):  # back into the answer, the forced end, then the thinking
        m.rollback(n)
        at -= n
        assert (list(_allowed(m)), m.forced_tokens(), m.accepts_eos()) == seen[at]
    _advance(m, path[at:])
    assert m.accepts_eos()
    twin.rollback(len(path))
    assert twin.forced_tokens() == tok.encode("<think>") and not twin.accepts_eos()
    assert m.accepts_eos()  # the fork's rollback left the original alone
    with pytest.raises(ValueError, match="exceeds"):
        twin.rollback(1)


def test_without_an_inner_constraint_eos_may_end_thinking_or_answer():
    tok = _tok()
    m = ThinkingBudget(max_thinking_tokens=1).compile(tok)
    assert m.accepts_eos() and 2 in _allowed(m)
    _advance(m, tok.encode(" the")[:1])
    _advance(m, m.forced_tokens())
    assert m.accepts_eos() and len(_allowed(m)) == len(tok.hf) and not m.is_finished()


def test_matches_text_checks_the_answer_after_the_end():
    spec = ThinkingBudget(inner=Regex(r"[0-9]+"), start="<think>")
    assert spec.matches_text("<think>hmm</think>\n\n42")
    assert spec.matches_text("hmm</think>42")
    assert not spec.matches_text("<think>hmm</think>\n\nforty-two")
    assert not spec.matches_text("<think>hmm 42")
    assert ThinkingBudget().matches_text("x</think>anything")


def test_spec_is_hashable_and_checked():
    a = ThinkingBudget(inner=Regex("a"), max_thinking_tokens=3)
    assert a == ThinkingBudget(inner=Regex("a"), max_thinking_tokens=3) and hash(a) == hash(
        ThinkingBudget(inner=Regex("a"), max_thinking_tokens=3))
    with pytest.raises(ValueError, match="max_thinking_tokens"):
        ThinkingBudget(max_thinking_tokens=-1)
    with pytest.raises(ValueError, match="end"):
        ThinkingBudget(end="")
    with pytest.raises(ValueError, match="start"):
        ThinkingBudget(start="")
    with pytest.raises(TypeError, match="inner"):
        ThinkingBudget(inner="[0-9]+")  # type: ignore[arg-type]
    with pytest.raises(aiolm.ConstraintError):
        ThinkingBudget(inner=Regex(r"(?<=a)b")).validate()


# ------------------------------------------------------------------ through the engine


def _tiny_engine(**options) -> aiolm.Engine:
    from tiny_chat import tiny_chat_model

    return aiolm.Engine(tiny_chat_model(), max_total_tokens=2048, **options)


@pytest.mark.anyio
@pytest.mark.parametrize("jump_forward", [True, False])
async def test_engine_output_thinks_for_the_budget_then_answers(jump_forward):
    tok = _tok()
    spec = ThinkingBudget(inner=Regex(r"[0-9]+"), start="<think>", max_thinking_tokens=8)
    start, end = tok.encode("<think>"), tok.encode("</think>\n\n")
    async with _tiny_engine(jump_forward=jump_forward) as engine:
        for seed in range(3):
            done = await engine.generate("Think, then answer.", max_tokens=40, constraint=spec,
                                         temperature=1.0, seed=seed)
            ids = list(done.token_ids)
            assert ids[:len(start)] == start
            assert ids[len(start) + 8:len(start) + 8 + len(end)] == end
            assert done.text.startswith("<think>")
            thinking, _, answer = done.text[len("<think>"):].partition("</think>\n\n")
            assert thinking == tok.decode(ids[len(start):len(start) + 8])
            assert answer.isdigit() and answer.isascii()
            assert done.finish_reason in ("stop", "length")


@pytest.mark.anyio
async def test_engine_answer_after_thinking_follows_a_json_schema():
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    spec = ThinkingBudget(inner=JSONSchema(schema), max_thinking_tokens=5)
    async with _tiny_engine() as engine:
        done = await engine.generate("<think>\n", max_tokens=60, constraint=spec, seed=0,
                                     temperature=1.0)
    assert done.finish_reason == "stop"
    reasoning, content = R1.parse(done.text)
    jsonschema.validate(json.loads(content), schema)
    assert spec.matches_text(done.text)

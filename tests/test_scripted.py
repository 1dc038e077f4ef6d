"""ScriptedBackend: the deterministic stand-in model behaves exactly as DESIGN.md says."""

from __future__ import annotations

import anyio
import pytest

from aiolm import ConstraintError, UnsupportedFeature
from aiolm.backends import GenerateRequest, ScriptedBackend
from aiolm.backends.scripted import DEFAULT_REPLY
from aiolm.chat import SIMPLE_TEMPLATE, Message, TextPart, render_text
from aiolm.constraints import Choices, Regex
from aiolm.sampling import SamplingParams

pytestmark = pytest.mark.anyio


def request(prompt: str = "P", constraint=None, **sampling) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, sampling=SamplingParams(**sampling), constraint=constraint)


async def collect(backend: ScriptedBackend, req: GenerateRequest):
    async with backend.stream(req) as chunks:
        return [c async for c in chunks]


async def test_reply_streams_one_word_per_chunk_with_usage_on_the_last():
    backend = ScriptedBackend(lambda p: "one two  three\n")
    chunks = await collect(backend, request("a b"))
    assert [c.text for c in chunks] == ["one", " two", "  three", "\n"]
    assert [c.finish_reason for c in chunks] == [None, None, None, "stop"]
    assert chunks[-1].usage.prompt_tokens == 2 and chunks[-1].usage.completion_tokens == 3


async def test_reply_gets_the_prompt_text():
    seen = []
    backend = ScriptedBackend(lambda p: seen.append(p) or "ok")
    await collect(backend, request("exact prompt"))
    assert seen == ["exact prompt"]


async def test_without_reply_the_answer_is_the_fixed_text():
    backend = ScriptedBackend()
    completion = await backend.generate(request())
    assert completion.text == DEFAULT_REPLY
    assert completion.finish_reason == "stop"


async def test_stop_string_truncates_before_it_and_is_reported():
    backend = ScriptedBackend(lambda p: "alpha beta. gamma. delta")
    completion = await backend.generate(request(stop=["ZZ", ". g"]))
    assert completion.text == "alpha beta"
    assert (completion.finish_reason, completion.matched_stop) == ("stop", ". g")


async def test_earliest_stop_wins_among_strings_and_regex():
    backend = ScriptedBackend(lambda p: "a1 b22 c333")
    by_regex = await backend.generate(request(stop=["c"], stop_regex=r"\d\d"))
    assert (by_regex.text, by_regex.matched_stop) == ("a1 b", "22")
    by_string = await backend.generate(request(stop=["1"], stop_regex=r"\d\d"))
    assert (by_string.text, by_string.matched_stop) == ("a", "1")


async def test_max_tokens_counts_words():
    backend = ScriptedBackend(lambda p: "w1 w2 w3 w4 w5")
    completion = await backend.generate(request(max_tokens=3))
    assert (completion.text, completion.finish_reason) == ("w1 w2 w3", "length")
    assert completion.usage.completion_tokens == 3
    exact = await backend.generate(request(max_tokens=5))
    assert (exact.text, exact.finish_reason) == ("w1 w2 w3 w4 w5", "stop")
    empty = await backend.generate(request(max_tokens=0))
    assert (empty.text, empty.finish_reason) == ("", "length")


async def test_stop_before_max_tokens_finishes_with_stop():
    backend = ScriptedBackend(lambda p: "w1 w2\nw3 w4 w5")
    completion = await backend.generate(request(max_tokens=3, stop="\n"))
    assert (completion.text, completion.finish_reason) == ("w1 w2", "stop")


async def test_a_stop_arriving_with_the_word_after_max_tokens_is_never_met():
    # As on the engine: "\n" comes with the third word, which max_tokens=2 never produces.
    backend = ScriptedBackend(lambda p: "w1 w2\nw3")
    completion = await backend.generate(request(max_tokens=2, stop="\n"))
    assert (completion.text, completion.finish_reason, completion.matched_stop) == (
        "w1 w2", "length", None)


@pytest.mark.parametrize(
    "constraint", [Regex(r"[0-9]+"), Choices(["yes", "no"])], ids=["regex", "choices"]
)
async def test_reply_violating_constraint_raises_constraint_error(constraint):
    backend = ScriptedBackend(lambda p: "maybe")
    with pytest.raises(ConstraintError, match="maybe"):
        await backend.generate(request(constraint=constraint))
    assert backend.statistics().active_streams == 0


async def test_reply_satisfying_constraint_after_stop_passes():
    backend = ScriptedBackend(lambda p: "123\nrest")
    completion = await backend.generate(request(constraint=Regex(r"[0-9]+"), stop="\n"))
    assert completion.text == "123"


async def test_json_schema_constraint_checks_the_reply():
    from aiolm.constraints import JSONSchema

    schema = JSONSchema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    good = await ScriptedBackend(lambda p: '{"a": 1}').generate(request(constraint=schema))
    assert good.text == '{"a": 1}'
    with pytest.raises(ConstraintError):
        await ScriptedBackend(lambda p: '{"a": "x"}').generate(request(constraint=schema))


async def test_logprobs_are_returned_when_asked():
    backend = ScriptedBackend(lambda p: "a b a")
    completion = await backend.generate(request(logprobs=True, top_logprobs=2))
    assert [lp.token for lp in completion.logprobs] == ["a", " b", " a"]
    assert all(lp.logprob == 0.0 and len(lp.top) == 1 for lp in completion.logprobs)
    assert completion.token_ids[0] != completion.token_ids[2]  # "a" and " a" differ
    plain = await backend.generate(request())
    assert plain.logprobs == ()


async def test_chat_messages_render_with_the_simple_template():
    seen = []
    backend = ScriptedBackend(lambda p: seen.append(p) or "fine")
    messages = (
        Message(role="system", parts=(TextPart(text="Be brief."),)),
        Message(role="user", parts=(TextPart(text="How are you?"),)),
        Message(role="assistant", parts=(TextPart(text="I am"),)),
    )
    await backend.generate(GenerateRequest(messages=messages))
    assert seen == [render_text(messages[:2], SIMPLE_TEMPLATE, open_role="assistant", open_text="I am")]
    assert seen[0] == "SYSTEM: Be brief.\nUSER: How are you?\nASSISTANT: I am"


async def test_token_id_prompts_are_unsupported():
    backend = ScriptedBackend()
    with pytest.raises(UnsupportedFeature, match="tokenizer"):
        await backend.generate(GenerateRequest(input_ids=(1, 2)))


async def test_score_picks_longest_shared_prefix_first_on_ties():
    backend = ScriptedBackend(lambda p: "blue sky")
    result = await backend.score(request(), ["green", "blue sea", "blue sky!", "blue"])
    assert result.index == 2  # "blue sky" shares 8 characters with "blue sky!"
    tie = await backend.score(request(), ["red", "gray"])
    assert tie.index == 0
    assert result.normalized_logprobs[2] == 0.0 and result.normalized_logprobs[0] < 0


async def test_statistics_count_calls():
    backend = ScriptedBackend()
    await backend.generate(request())
    await backend.score(request(), ["a"])
    await backend.prefill(request())
    stats = backend.statistics()
    assert (stats.calls, stats.score_calls, stats.prefill_calls, stats.active_streams) == (1, 1, 1, 0)
    assert len(backend.requests) == 1


async def test_leaving_the_stream_early_releases_it():
    backend = ScriptedBackend(lambda p: "a b c d e f", delay=0.01)
    async with backend.stream(request()) as chunks:
        async for _ in chunks:
            assert backend.statistics().active_streams == 1
            break
    assert backend.statistics().active_streams == 0


async def test_delay_streams_pieces_over_time_and_cancels_mid_stream():
    backend = ScriptedBackend(lambda p: " ".join(["w"] * 100), delay=0.01)
    received = []
    with anyio.move_on_after(0.05):
        async with backend.stream(request()) as chunks:
            async for chunk in chunks:
                received.append(chunk)
    assert 0 < len(received) < 100
    assert backend.statistics().active_streams == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"reply": "text"}, "reply"), ({"delay": -1}, "delay"), ({"delay": "1"}, "delay"),
     ({"delay": float("inf")}, "delay")],
)
def test_constructor_rejects_bad_arguments_naming_them(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        ScriptedBackend(**kwargs)


async def test_reply_returning_non_string_is_a_type_error():
    backend = ScriptedBackend(lambda p: 42)
    with pytest.raises(TypeError, match="reply"):
        await backend.generate(request())

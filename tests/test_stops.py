"""One stop matcher for every backend: its rules, then the same stop cases run on the engine,
the scripted backend, the OpenAI backend (applying the stops on the client) and speculative
execution, with identical results.

The shared model output is sampled from a tiny random-weight model whose logits are biased
towards a few words that are one token each (``" a"``, ``" cat"``, ...): a seeded, varied
text whose tokens are also the scripted backend's words and the OpenAI stream's deltas, so
every backend sees the same pieces.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import pytest
import regex
from fake_openai import FakeAPI, completion_stream
from tiny_chat import tiny_chat_model

import aiolm
from aiolm.backends import GenerateRequest, ScriptedBackend
from aiolm.backends._speculative import Speculation, cut, sampling_key
from aiolm.sampling import SamplingParams
from aiolm.stops import StopMatcher

# --------------------------------------------------------------------- the rules


def run_pieces(pieces: list[str], stop=(), stop_regex=None) -> tuple[list[str], str, str | None]:
    """Feed ``pieces`` one by one; return the streamed deltas, the output and the stop."""
    m = StopMatcher(stop, stop_regex)
    deltas = []
    for piece in pieces:
        delta, matched = m.feed(piece)
        deltas.append(delta)
        if matched is not None:
            return deltas, m.text, matched
    deltas.append(m.flush())
    return deltas, m.text, None


def test_the_earliest_stop_wins_whatever_its_place_in_the_list():
    _, text, matched = run_pieces(["x", "yz STOP", " also END"], stop=["END", "STOP"])
    assert (text, matched) == ("xyz ", "STOP")


def test_at_one_position_a_stop_string_beats_the_regex_and_the_earlier_listed_string():
    assert run_pieces(["a-42"], stop=["-4"], stop_regex=r"-\d+")[1:] == ("a", "-4")
    assert run_pieces(["a-42"], stop=["-42", "-4"])[1:] == ("a", "-42")


def test_a_stop_counts_as_soon_as_the_pieces_so_far_contain_it():
    # After "ab" the text contains "b"; "abc" would start earlier but is not complete yet.
    assert run_pieces(["ab", "c"], stop=["abc", "b"])[1:] == ("a", "b")
    assert run_pieces(["abc"], stop=["abc", "b"])[1:] == ("", "abc")
    # A greedy regex stops at its first complete match, not at what it could grow to.
    assert run_pieces([" c", " c", " c"], stop_regex=r"(?: c)+")[1:] == ("", " c")


def test_text_that_could_begin_a_stop_is_held_back_until_it_cannot():
    deltas, text, matched = run_pieces(["a", "EN", "D?", "b"], stop="END!")
    assert deltas == ["a", "", "END?", "b", ""] and matched is None
    deltas, text, matched = run_pieces(["Answer", ": 4", "2", ".", " Then"], stop_regex=r"\d+\.")
    assert deltas == ["Answer", ": ", "", ""]
    assert (text, matched) == ("Answer: ", "42.")


def test_held_text_is_released_at_the_end():
    deltas, text, matched = run_pieces(["one", " tw"], stop=" two", stop_regex=r"x{3}")
    assert deltas == ["one", "", " tw"] and (text, matched) == ("one tw", None)


def test_text_appended_without_stops_never_begins_one():
    m = StopMatcher(["\n"])
    assert m.append("x\n", can_stop=False) is None
    assert m.append("y") is None and m.release() == "x\ny"
    assert m.append("\nz") == "\n" and m.text == "x\ny"


def test_after_a_stop_further_text_is_ignored():
    m = StopMatcher(["."])
    assert m.feed("a. b") == ("a", ".")
    assert m.feed("c") == ("", ".") and m.text == "a" and m.flush() == ""


def test_zero_width_regex_matches_never_stop():
    assert run_pieces(["ab", " cd"], stop_regex=r"\b")[1:] == ("ab cd", None)


def test_bad_stops_are_refused():
    with pytest.raises(ValueError, match=r"stop_regex: 'a\*' matches the empty string"):
        StopMatcher(stop_regex="a*")
    with pytest.raises(ValueError, match="stop: stop strings must be non-empty"):
        StopMatcher(["x", ""])


def test_regex_searches_share_one_time_budget_per_step():
    m = StopMatcher(stop_regex="(a|a)*b", regex_timeout=0.05)
    start = time.monotonic()
    with pytest.raises(ValueError, match="stop_regex: took longer than 50 ms"):
        for piece in ["a"] * 40 + ["X"]:   # the X makes the search backtrack
            m.append(piece)
    assert time.monotonic() - start < 2.0
    fresh = StopMatcher(stop_regex="(a|a)*b", regex_timeout=0.05)
    for _ in range(3):   # a new budget each step: short searches never add up
        fresh.feed("a")
        time.sleep(0.03)


# ------------------------------------------------------- the same cases, every backend

WORDS = (" a", " b", " ab", " c", " x", " .", " the", " cat")
#: Stop strings no output here contains: with them every case has more than the four stop
#: strings the OpenAI API takes, so the OpenAI backend applies them on the client.
DECOYS = ("<0>", "<1>", "<2>", "<3>", "<4>")
N = 40


def biased_sampling(model) -> SamplingParams:
    """Seeded sampling that makes the model write :data:`WORDS` in a random order."""
    bias = {}
    for word in WORDS:
        (token,) = model.tokenizer.encode(word)
        bias[token] = 100.0
    return SamplingParams(max_tokens=N, temperature=1.0, seed=3, ignore_eos=True,
                          logit_bias=bias)


def stop_cases(pieces: list[str]) -> list[tuple[str, dict[str, Any], str, str | None]]:
    """(name, stop options, expected output, expected stop), derived from the model's text."""
    text = "".join(pieces)
    ends = [sum(map(len, pieces[:k + 1])) for k in range(len(pieces))]

    def at(k: int, n: int) -> str:   # n characters around the end of piece k
        return text[ends[k] - 2: ends[k] - 2 + n]

    def first(*stops: str) -> tuple[str, str]:
        pos, s = min((text.find(s), s) for s in stops if s in text)
        return text[:pos], s

    across = at(N // 2, 4)
    early, late = at(N // 4, 4), at(3 * N // 4, 4)
    word = next(p for p in pieces[N // 3:] if len(p) >= 4)[1:]
    same = at(N // 2 + 3, 3)
    # A word the text repeats three times in a row: a greedy regex would take all three.
    repeated = next(w for w in WORDS if w * 3 in text)
    return [
        ("a stop string across two tokens", {"stop": [across]}, *first(across)),
        ("a stop string inside a token", {"stop": [word]}, *first(word)),
        ("the earliest of two stop strings", {"stop": [late, early]}, *first(late, early)),
        ("a regex of alternatives", {"stop_regex": f"{regex.escape(late)}|{regex.escape(early)}"},
         *first(late, early)),
        ("a stop string before the regex it starts",
         {"stop": [same], "stop_regex": regex.escape(at(N // 2 + 3, 4))}, *first(same)),
        ("a greedy regex at its first complete match",
         {"stop_regex": f"(?:{regex.escape(repeated)}){{2,}}"}, *first(repeated * 2)),
        ("a regex that begins but never completes",
         {"stop_regex": regex.escape(pieces[N // 2]) + " zzz"}, text, None),
        ("no stop in the text", {}, text, None),
    ]


async def outcome(backend: Any, request: GenerateRequest) -> tuple[str, str | None, str | None]:
    """(streamed text, finish reason, matched stop) of a request."""
    streamed, last = [], None
    async with backend.stream(request) as chunks:
        async for chunk in chunks:
            streamed.append(chunk.text)
            last = chunk
    return "".join(streamed), last.finish_reason, last.matched_stop


@pytest.mark.anyio
async def test_every_backend_stops_the_same_text_at_the_same_place():
    model = tiny_chat_model()
    base = biased_sampling(model)
    async with aiolm.Engine(model, max_total_tokens=4096) as engine:
        reference = await engine.generate(GenerateRequest(input_ids=(1, 2, 3), sampling=base))
        pieces = [model.tokenizer.decode([t]) for t in reference.token_ids]
        assert "".join(pieces) == reference.text and len(set(pieces)) > 3
        api = FakeAPI(completion_stream(pieces, finish="length"), owned_by="aiolm")
        openai = aiolm.OpenAI("m", client=api.client(), chat=False, backoff=0.001)
        scripted = ScriptedBackend(lambda prompt: reference.text)
        for name, stops, want_text, want_stop in stop_cases(pieces):
            rules = attrs.evolve(base, stop=(*stops.get("stop", ()), *DECOYS),
                                 stop_regex=stops.get("stop_regex"))
            results = {
                "engine": await outcome(engine, GenerateRequest(input_ids=(1, 2, 3),
                                                                sampling=rules)),
                "scripted": await outcome(scripted, GenerateRequest(prompt="Q", sampling=rules)),
                "openai": await outcome(openai, GenerateRequest(prompt="Q", sampling=rules)),
            }
            spec = cut(Speculation(key="Q", text=reference.text, tokens=tuple(pieces),
                                   finished=False, sampling=sampling_key(rules)), 0, rules)
            results["speculation"] = (spec.text, spec.finish_reason, spec.matched_stop)
            for backend, (text, finish, matched) in results.items():
                assert (text, matched) == (want_text, want_stop), (name, backend)
                if want_stop is not None:
                    assert finish == "stop", (name, backend)
        assert all("stop" not in body for body in api.bodies)   # applied on the client

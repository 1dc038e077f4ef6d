"""Stop conditions and stream-safe text: stop strings across tokens, stop_regex, ids, lengths."""

from __future__ import annotations

import pytest

from aiolm.engine.stopping import StopChecker
from aiolm.sampling import SamplingParams

EOS = 0


class PieceDetokenizer:
    """Token id i decodes to PIECES[i] (a stand-in for the real incremental detokenizer)."""

    def __init__(self, pieces: dict[int, str]) -> None:
        self.pieces = pieces

    def feed(self, ids):
        return "".join(self.pieces.get(i, "") for i in ids)  # EOS decodes to nothing

    def flush(self):
        return ""


def checker_for(text_pieces: list[str], **params) -> tuple[StopChecker, list[int]]:
    pieces = {i + 1: p for i, p in enumerate(text_pieces)}
    sp = SamplingParams(max_tokens=params.pop("max_tokens", 100), **params)
    return (StopChecker(sp, eos_token_ids=[EOS], detokenizer=PieceDetokenizer(pieces)),
            list(pieces))


def stream(checker: StopChecker, ids: list[int]) -> tuple[list[str], int]:
    """Feed one token at a time; return the streamed deltas and how many tokens were used."""
    deltas, used = [], 0
    for tok in ids:
        upd = checker.feed([tok])
        used += upd.consumed
        deltas.append(upd.text)
        if upd.finish_reason:
            break
    return deltas, used


def test_stop_string_split_across_tokens_is_never_streamed():
    checker, ids = checker_for(["Hello", " wor", "ld", "\n", "\nmore", " text"], stop="\n\n")
    deltas, used = stream(checker, ids)
    assert "".join(deltas) == "Hello world"
    assert all("\n" not in d for d in deltas)
    assert checker.finish_reason == "stop"
    assert checker.matched_stop == "\n\n"
    assert used == 5


def test_held_back_prefix_is_released_when_it_does_not_complete():
    checker, ids = checker_for(["a", "EN", "D?", "b"], stop="END!")
    deltas, _ = stream(checker, ids)
    assert deltas == ["a", "", "END?", "b"]
    assert checker.finish_reason is None


def test_earliest_of_several_stop_strings_wins():
    checker, ids = checker_for(["x", "yz STOP", " also END"], stop=["END", "STOP"])
    deltas, _ = stream(checker, ids)
    assert "".join(deltas) == "xyz "
    assert checker.matched_stop == "STOP"


def test_stop_regex_holds_back_partial_matches():
    checker, ids = checker_for(["Answer", ": 4", "2", ".", " Then"], stop_regex=r"\d+\.")
    deltas, _ = stream(checker, ids)
    assert deltas[0] == "Answer"
    assert deltas[1] == ": "          # "4" could start a match, so it waits
    assert "".join(deltas) == "Answer: "
    assert checker.finish_reason == "stop"
    assert checker.matched_stop == "42."


def test_stop_regex_partial_that_fails_is_streamed():
    checker, ids = checker_for(["v", "1", "x"], stop_regex=r"\d\d")
    deltas, _ = stream(checker, ids)
    assert deltas == ["v", "", "1x"]


def test_stop_regex_matching_empty_string_is_refused():
    with pytest.raises(ValueError, match="stop_regex"):
        checker_for(["a"], stop_regex=r"a*")


def test_eos_stops_and_is_left_out_of_text():
    checker, ids = checker_for(["one", " two"])
    deltas, used = stream(checker, [ids[0], EOS, ids[1]])
    assert "".join(deltas) == "one"
    assert used == 2
    assert checker.finish_reason == "stop"
    assert checker.matched_stop == EOS


def test_ignore_eos_keeps_going_until_length():
    checker, ids = checker_for(["one"], ignore_eos=True, max_tokens=3)
    _, used = stream(checker, [EOS, ids[0], EOS, ids[0]])
    assert used == 3
    assert checker.finish_reason == "length"
    assert checker.text == "one"


def test_stop_token_ids_stop_with_the_id_recorded():
    checker, ids = checker_for(["a", "b"], stop_token_ids=[2])
    _, used = stream(checker, ids)
    assert (checker.finish_reason, checker.matched_stop, used) == ("stop", 2, 2)
    assert checker.text == "a"


def test_max_tokens_finishes_with_length_and_flushes_held_text():
    checker, ids = checker_for(["a", "b", "EN"], stop="END", max_tokens=3)
    deltas, _ = stream(checker, ids)
    assert deltas == ["a", "b", "EN"]
    assert checker.finish_reason == "length"


def test_min_tokens_delays_every_stop_condition():
    checker, ids = checker_for(["x\n", "y", "\nz"], stop="\n", min_tokens=3)
    deltas, used = stream(checker, [EOS, *ids])
    assert "".join(deltas) == "x\ny"
    assert checker.matched_stop == "\n"
    assert used == 4


def test_jump_forward_tokens_after_the_stop_are_not_consumed():
    checker, ids = checker_for(["a", "STOP", "b", "c"], stop="STOP")
    upd = checker.feed(ids)
    assert upd.consumed == 2
    assert upd.text == "a"
    assert upd.finish_reason == "stop"
    assert checker.feed(ids).consumed == 0


def test_stop_strings_need_a_tokenizer():
    with pytest.raises(ValueError, match="stop"):
        StopChecker(SamplingParams(stop="x"), eos_token_ids=[], detokenizer=None)
    ids_only = StopChecker(SamplingParams(max_tokens=2), eos_token_ids=[9], detokenizer=None)
    assert ids_only.feed([1, 2]).finish_reason == "length"

"""The engine loop's steps: a batch computed, then each request's part of it processed.

:class:`StepProcessing` is the part of :class:`~aiolm.engine.core.EngineCore` that runs
one step (see the module docstring of :mod:`aiolm.engine.core`): the serial step and the
overlapped one (launch the next batch, then process the step in flight), and, per request,
appending its sampled (and jump-forward) tokens, stop checks, detokenization, scores and
logprobs, the constraint bitmask and the watchdog's budget. ``_ReqState`` is the
engine-side state of one request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from ..errors import ConstraintError, EngineError
from ..values import TokenLogprob, Usage
from .events import RequestOutput
from .step_output import LaunchedStep, SampledToken
from .stopping import StopChecker

if TYPE_CHECKING:
    from .events import Event
    from .grammar_backend import GrammarBackend
    from .request import Req
    from .runner import ModelRunner
    from .scheduler import ScheduleBatch, Scheduler
    from .tokenizer import Tokenizer

_log = logging.getLogger("aiolm.engine")


@attrs.define(eq=False)
class _ReqState:
    """Engine-side state of one request (kept in ``Req.user_data``).

    ``scores``: position -> (raw logprob, is_greedy, top alternatives) of the known tokens
    a scoring request computed. ``prompt_logprobs``: the request's first event still has
    to carry its prompt's logprobs.
    """

    checker: StopChecker
    want_logprobs: bool
    prompt_logprobs: bool = False
    scores: dict[int, tuple[float, bool, tuple[tuple[int, float], ...]]] = attrs.field(
        factory=dict)


@attrs.define(eq=False)
class _InFlight:
    """A launched step whose results the host has not processed yet; ``placeholders``:
    batch row -> index in that request's ``all_ids`` of the token the step samples."""

    step: LaunchedStep
    placeholders: dict[int, int]


class StepProcessing:
    """The step methods of :class:`~aiolm.engine.core.EngineCore` (a mixin: the state it
    reads and mutates is the core's, set up by ``EngineCore.__init__``)."""

    runner: ModelRunner
    scheduler: Scheduler
    grammar: GrammarBackend
    _grammar_stepwise: GrammarBackend
    tokenizer: Tokenizer | None
    eos_token_ids: frozenset[int]
    context_len: int
    vocab_size: int
    _live: dict[str, Req]
    _mask_failures: dict[str, Exception]
    _budget: float
    _fill_rows_alone: bool
    _in_flight: _InFlight | None
    _totals: dict[str, int]

    def _step(self, batch: ScheduleBatch, events: list[Event]) -> None:
        """One step of the loop that does not overlap: compute ``batch``, then process it."""
        out = self.runner.run(batch, self._bitmask)
        self._process_step(batch, out, {}, events)

    def _step_overlapped(self, batch: ScheduleBatch, events: list[Event]) -> None:
        """Launch ``batch``, then process the step in flight while the device computes it.

        ``batch`` stays in flight unless it is :meth:`_serialized`. A pass that may not be
        queued behind another (``ModelRunner.queues_behind``: an extend planned by
        flashinfer) waits for the step in flight to be processed first; it holds no
        placeholder, and processing that step touches none of its requests but its decode
        riders (``mix_decode``): their placeholders are filled then, and those it finished
        leave the batch.
        """
        if not self.runner.queues_behind(batch.mode):
            self._settle(events)
            batch = self.scheduler.without_finished_riders(batch)
        previous, self._in_flight = self._in_flight, None
        launched = self.runner.launch(batch, self._bitmask,
                                      previous=previous.step if previous is not None else None)
        flight = _InFlight(launched, self._hold_places(batch, launched))
        self.scheduler.launched(batch)
        if previous is not None:
            self._complete(previous, events)
        if self._serialized(batch):
            self._complete(flight, events)
        else:
            self._in_flight = flight

    def _hold_places(self, batch: ScheduleBatch, launched: LaunchedStep) -> dict[int, int]:
        """Append a placeholder for each token ``launched`` samples (``-1 - j`` for
        ``next_ids[j]``); returns where each one is, by batch row."""
        places = {}
        for j, row in enumerate(launched.sample_rows):
            req = batch.reqs[row]
            req.all_ids.append(-1 - j)
            req.pending += 1
            places[row] = len(req.all_ids) - 1
        return places

    @staticmethod
    def _serialized(batch: ScheduleBatch) -> bool:
        """Whether ``batch`` must be processed before the next step is scheduled: one of its
        requests needs the host to know its sampled token before its next step can run.

        A constrained request (its next mask and any jump-forward depend on the token), a
        frequency or presence penalty (the counts of its tokens), a scoring request (select,
        ``prompt_logprobs``: its scores shape its next pass).
        """
        for req in batch.reqs:
            p = req.sampling
            if (req.matcher is not None or req.return_all_logits
                    or p.frequency_penalty or p.presence_penalty):
                return True
        return False

    def _settle(self, events: list[Event]) -> None:
        """Process the step in flight, if any (waits for the device)."""
        flight, self._in_flight = self._in_flight, None
        if flight is not None:
            self._complete(flight, events)

    def _complete(self, flight: _InFlight, events: list[Event]) -> None:
        """Fetch a launched step's results and process them (waits for its copy)."""
        out = self.runner.fetch(flight.step)
        self._process_step(flight.step.batch, out, flight.placeholders, events)

    def _process_step(self, batch: ScheduleBatch, out: Any, placeholders: dict[int, int],
                      events: list[Event]) -> None:
        """Each request's part of a computed step, then the scheduler's.

        ``placeholders`` (the overlapped loop): batch row -> where the row's sampled token
        stands in its ``all_ids``. That placeholder and any after it (a later step in
        flight) come off before the request is processed, which then sees ``all_ids`` as the
        loop that does not overlap would; the later ones go back unless it finished, when
        the K/V computed for them no longer count.
        """
        for row, req in enumerate(batch.reqs):
            if self._live.get(req.rid) is not req:
                continue  # aborted (or failed) since the step was launched
            at = placeholders.get(row)
            later: list[int] = []
            if at is not None:
                later = req.all_ids[at + 1:]
                del req.all_ids[at:]
                req.pending -= 1 + len(later)
            try:
                failure = self._mask_failures.pop(req.rid, None)
                failure = out.failed.get(row, failure)
                if failure is not None:
                    raise failure
                start = time.perf_counter()
                self._process(req, row, batch, out.sampled.get(row), out.scored.get(row), events)
                elapsed = time.perf_counter() - start
                if elapsed > self._budget and not req.finished:
                    raise self._overran(req, elapsed, "advancing its constraint, stop checks "
                                        "and detokenization")
            except Exception as exc:  # one request's failure must not sink the others
                req.finish_reason = "abort"
                events.append(RequestOutput(rid=req.rid, finish_reason="abort",
                                            usage=self._usage(req), error=exc))
            if later and req.finished:
                self.scheduler.drop_in_flight(req, len(later))
            elif later:
                req.all_ids.extend(later)
                req.pending += len(later)
            if req.finished:
                del self._live[req.rid]
                self.runner.sampler.release(req.rid)
                self._totals["finished_requests"] += 1
                self._totals["completion_tokens"] += req.num_outputs - req.pending
        self.scheduler.process_result(batch)

    def _process(self, req: Req, row: int, batch: ScheduleBatch, sampled: SampledToken | None,
                 scored: Any, events: list[Event]) -> None:
        state: _ReqState = req.user_data
        if scored is not None:
            tops = scored.top or ((),) * len(scored.logprobs)
            for k, entry in enumerate(zip(scored.logprobs, scored.greedy, tops, strict=True)):
                state.scores[scored.first + k] = entry
        if not batch.sample_mask[row] or req.finished:
            return
        prompt_logprobs = self._prompt_logprobs(req) if state.prompt_logprobs else None
        if req.sampling.max_tokens == 0:
            req.finish_reason = "length"
            events.append(RequestOutput(
                rid=req.rid, finish_reason="length", usage=self._usage(req),
                scores=tuple((p, lp, g) for p, (lp, g, _) in sorted(state.scores.items())),
                prompt_logprobs=prompt_logprobs,
            ))
            return
        assert sampled is not None, "the runner sampled every row of sample_mask"
        new = [sampled.token_id]
        matcher = req.matcher
        if matcher is not None and not (sampled.token_id in self.eos_token_ids
                                        and matcher.accepts_eos()):
            limit = req.sampling.max_tokens - len(req.output_ids) - 1
            grammar = self._grammar_stepwise if state.want_logprobs else self.grammar
            jump = grammar.after_sample(matcher, sampled.token_id, limit=limit)
            if not jump.ok:
                raise ConstraintError(
                    f"the constraint rejected the sampled token {sampled.token_id}: {jump.reason}"
                )
            new = new[: len(new) - jump.rollback] + list(jump.append)
        upd = state.checker.feed(new)
        kept = new[: upd.consumed]
        req.output_ids.extend(kept)
        text, reason, matched = upd.text, upd.finish_reason, upd.matched_stop
        if reason is None and req.seq_len >= self.context_len:
            tail = state.checker.finish_length()
            text, reason = text + tail.text, tail.finish_reason
        logprobs: tuple[TokenLogprob, ...] = ()
        if state.want_logprobs and sampled.logprob is not None and kept[:1] == [sampled.token_id]:
            logprobs = (self._token_logprob(sampled),)
        if reason is not None:
            req.finish_reason = reason
        events.append(RequestOutput(
            rid=req.rid, text=text, token_ids=tuple(kept), logprobs=logprobs,
            finish_reason=reason, matched_stop=matched,
            usage=self._usage(req) if reason is not None else None,
            prompt_logprobs=prompt_logprobs,
        ))

    def _prompt_logprobs(self, req: Req) -> tuple[TokenLogprob | None, ...]:
        """The prompt's logprobs from the scores its prefill computed (once per request).

        From here on the request is an ordinary one: its later passes compute only the last
        logits, and a recompute after retraction may take its prefix from the cache.
        """
        state: _ReqState = req.user_data
        state.prompt_logprobs = False
        req.return_all_logits, req.max_prefix_match = False, None
        prompt = req.input_ids
        # Every prompt token after the first was computed in this request's own prefill
        # (``max_prefix_match == 0``), so each has its score.
        scores = [state.scores[p] for p in range(1, len(prompt))]
        state.scores.clear()
        # An image's placeholders (pad ids, past the vocabulary) are no tokens: None there.
        vocab = self.vocab_size
        texts = self._token_texts([*(t for t in prompt if t < vocab),
                                   *(t for *_, top in scores for t, _ in top)])
        entries: list[TokenLogprob | None] = [None]
        for token, (lp, _, top) in zip(prompt[1:], scores, strict=True):
            entries.append(None if token >= vocab else TokenLogprob(
                token_id=token, token=texts[token], logprob=lp,
                top=tuple((t, texts[t], alt) for t, alt in top)))
        return tuple(entries)

    def _bitmask(self, reqs: Sequence[Req]) -> torch.Tensor | None:
        """The batch's constraint bitmask; a matcher that fails fails only its request.

        The batch's rows are filled together. When that fails, or at the step after it took
        longer than the watchdog's budget, each row is filled alone and timed: a matcher
        that fails or is over the budget fails only its request (after the step).
        """
        if not self._fill_rows_alone:
            start = time.perf_counter()
            try:
                mask = self.grammar.bitmask_for(reqs)
            except Exception:
                pass
            else:
                self._fill_rows_alone = time.perf_counter() - start > self._budget
                return mask
        self._fill_rows_alone = False
        mask = torch.full((len(reqs), self.grammar.words), -1, dtype=torch.int32)
        for i, req in enumerate(reqs):
            if req.matcher is None:
                continue
            start = time.perf_counter()
            try:
                mask[i] = self.grammar.fill_bitmask([(0, req.matcher)], 1)[0]
            except Exception as exc:  # the request ends with this error after the step
                self._mask_failures[req.rid] = exc
                continue
            elapsed = time.perf_counter() - start
            if elapsed > self._budget:
                self._mask_failures[req.rid] = self._overran(req, elapsed,
                                                             "its constraint mask")
        return mask

    def _overran(self, req: Req, elapsed: float, work: str) -> EngineError:
        """The watchdog's error for ``req``, whose ``work`` took ``elapsed`` s (logged)."""
        _log.error("request %s: %s took %.3f s in one engine step (request_step_timeout is "
                   "%g s); aborting it", req.rid, work, elapsed, self._budget)
        return EngineError(
            f"the engine aborted this request: {work} took {elapsed:.3f} s in one step, over "
            f"its budget of {self._budget:g} s (request_step_timeout); simplify its "
            "constraint or stop conditions")

    def _token_logprob(self, sampled: SampledToken) -> TokenLogprob:
        return TokenLogprob(
            token_id=sampled.token_id, token=self._token_text(sampled.token_id),
            logprob=float(sampled.logprob or 0.0),
            top=tuple((t, self._token_text(t), lp) for t, lp in sampled.top),
        )

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def _token_texts(self, ids: Sequence[int]) -> dict[int, str]:
        """Each distinct token's text, as :meth:`_token_text` gives it, decoded in one call."""
        unique = list(dict.fromkeys(ids))
        if self.tokenizer is None:
            return dict.fromkeys(unique, "")
        return dict(zip(unique, self.tokenizer.decode_each(unique), strict=True))

    @staticmethod
    def _usage(req: Req) -> Usage:
        return Usage(prompt_tokens=req.prompt_len, completion_tokens=req.num_outputs - req.pending,
                     cached_tokens=req.cached_len)

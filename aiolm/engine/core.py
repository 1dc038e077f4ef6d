"""The engine core: the synchronous scheduling/model loop on its own thread.

It knows token ids and text, not programs or chat roles. Commands arrive through an inbox
queue (add a request, abort one, flush the cache, shut down); each step of the loop:

1. drains the inbox;
2. asks the scheduler for a batch and the runner to compute it;
3. for each request that got a token: appends it (and any tokens a constraint forces:
   jump-forward), advances its constraint matcher, checks stop conditions, detokenizes;
4. hands the batch back to the scheduler (``process_result``);
5. posts *all* of the step's events to the async side in one call of ``post``.

The overlapped loop (``overlap``, the default with CUDA) reorders that so the host works
while the device computes: step N+1 is scheduled and launched (forward pass, sampling and
the copy of the results, queued on the device) before step N's results are processed, so
3-5 for step N run while the device computes step N+1. The tokens step N samples stay on
the device and feed step N+1's inputs: until the host learns them they stand in
``Req.all_ids`` as placeholders (:mod:`aiolm.engine.request`). A request that finishes at
step N was computed once more at step N+1: that token is dropped and its slot freed, so
the results are those of the loop that does not overlap. A step whose requests need their
tokens on the host before their next step runs serialized (:meth:`EngineCore._serialized`):
its results are processed before the next step is scheduled.

``post`` must be thread-safe and must not block (the async front schedules the fan-out on
its event loop). The loop never imports anyio. An error while handling one request (preparing
its sampling, its constraint mask, advancing its matcher, stop checks, detokenization)
finishes that request with the error and the step goes on without it; an error in the loop
itself (scheduling, the forward pass) fails every open request and stops the engine.

The watchdog: each request's host-side work in a step is timed, and a request over
``config.request_step_timeout`` is aborted (logged, with an :class:`EngineError`) while the
others go on. Python work cannot be interrupted, so it bounds how many steps one request
can stall (one; two for a constraint mask, as a batch's masks are filled together: the step
that shows they are slow, then the next, which fills them one by one to find whose), not how
long one stall lasts: what can run long is bounded where it runs (``stop_regex`` searches
have their own time budget). The forward pass is not timed and cannot be interrupted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch

from ..cache.radix import RadixCache
from ..errors import BackendUnavailable, ConstraintError, EngineError
from ..sampling import SamplingParams
from ..values import TokenLogprob, Usage, hit_rate
from .forward_batch import ForwardMode
from .grammar_backend import GrammarBackend
from .request import Req
from .runner import LaunchedStep, ModelRunner, SampledToken
from .scheduler import Scheduler, check_fits
from .stopping import StopChecker

if TYPE_CHECKING:
    from torch import nn

    from ..constraints.base import Matcher
    from .config import EngineConfig
    from .model_config import ModelConfig
    from .scheduler import ScheduleBatch
    from .tokenizer import Tokenizer

__all__ = ["CommandDone", "EngineCore", "EngineFailed", "EngineStatistics", "IntegrityReport",
           "RequestOutput"]

_log = logging.getLogger("aiolm.engine")


@attrs.frozen(kw_only=True)
class RequestOutput:
    """What one step produced for one request (an event posted to the async side).

    ``error`` set: the request failed (it is finished). ``scores`` (scoring requests only):
    ``(position, logprob, is_greedy)`` of every known token whose logits were computed.
    ``prompt_logprobs`` (the request's first event, when it asked): one entry per prompt
    token, ``None`` for the first.
    """

    rid: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    matched_stop: str | int | None = None
    usage: Usage | None = None
    error: BaseException | None = None
    scores: tuple[tuple[int, float, bool], ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@attrs.frozen(kw_only=True)
class CommandDone:
    """A command's reply: ``ticket`` identifies the command, ``value`` is its result."""

    ticket: int
    value: Any = None


@attrs.frozen(kw_only=True)
class EngineFailed:
    """The loop stopped on an unexpected error; every open request is lost."""

    error: BaseException


@attrs.frozen(kw_only=True)
class EngineStatistics:
    """A snapshot of the engine as its last step left it.

    ``prompt_tokens`` / ``cached_tokens`` count each request's prompt, and the part of it
    served from the prefix cache, once, when it is first scheduled; ``cache_hit_rate`` is
    the radix cache's (:attr:`~aiolm.cache.radix.RadixCacheStatistics.hit_rate`):
    ``cached_tokens / prompt_tokens``. ``completion_tokens`` totals finished requests.
    """

    running_requests: int = 0
    queued_requests: int = 0
    free_kv_slots: int = 0
    total_kv_slots: int = 0
    cached_kv_tokens: int = 0
    evictable_kv_tokens: int = 0
    protected_kv_tokens: int = 0
    finished_requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    forward_passes: int = 0
    retractions: int = 0
    cache_hit_rate: float = 0.0


@attrs.frozen(kw_only=True)
class IntegrityReport:
    """What :meth:`EngineCore.check_integrity` verified, taken between two steps.

    ``request_slots``: KV slots held by requests (neither free nor in the radix cache);
    ``locked_tokens``: cached tokens locked by running requests; ``rows_in_use``: taken
    ``req_to_token`` rows. Once idle (no request waiting or running) all three are 0.
    """

    idle: bool
    running_requests: int
    waiting_requests: int
    free_slots: int
    cached_tokens: int
    request_slots: int
    locked_tokens: int
    rows_in_use: int


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


@attrs.frozen
class _Add:
    req: Req


@attrs.frozen
class _Abort:
    rid: str


@attrs.frozen
class _Flush:
    ticket: int


@attrs.frozen
class _Check:
    ticket: int


@attrs.frozen
class _Shutdown:
    pass


Event = RequestOutput | CommandDone | EngineFailed


class EngineCore:
    """The engine loop and the thread-safe calls into it.

    Construction builds the runner (KV memory) and scheduler; :meth:`start` starts the
    loop thread. :meth:`new_request` validates on the caller's thread; :meth:`add`,
    :meth:`abort`, :meth:`flush_cache` and :meth:`shutdown` only post to the inbox.
    ``failure`` is the error that stopped the loop (``None`` while it runs), set on the
    loop thread before the :class:`EngineFailed` event is posted.
    """

    def __init__(self, config: EngineConfig, *, model: nn.Module, model_config: ModelConfig,
                 tokenizer: Tokenizer | None, device: torch.device,
                 post: Callable[[list[Event]], None]) -> None:
        self.config = config
        self.tokenizer = tokenizer
        eos = set(model_config.eos_token_ids)
        if tokenizer is not None:
            eos.update(tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self.runner = ModelRunner(config, model=model, model_config=model_config, device=device,
                                  eos_token_ids=sorted(eos))
        self.context_len = model_config.context_len
        self.vocab_size = model_config.vocab_size
        self.cache = RadixCache(self.runner.allocator, disabled=not config.enable_radix_cache)
        self.scheduler = Scheduler(
            cache=self.cache,
            allocator=self.runner.allocator,
            req_to_token_pool=self.runner.req_to_token_pool,
            policy=config.schedule_policy,
            chunked_prefill_size=self.runner.chunked_prefill_size,
            max_running_requests=self.runner.max_running_requests,
            max_prefill_tokens=self.runner.chunked_prefill_size,
            aging_limit=config.aging_limit,
        )
        self.grammar = GrammarBackend(self.vocab_size, jump_forward=config.jump_forward,
                                      device=device)
        # Requests that ask for logprobs sample every token (forced tokens included).
        self._grammar_stepwise = GrammarBackend(self.vocab_size, jump_forward=False)
        self._post = post
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._live: dict[str, Req] = {}
        self._mask_failures: dict[str, Exception] = {}
        self._budget = config.request_step_timeout
        # A batch's masks took longer than the budget: fill the next step's rows one by one,
        # timed, to find the request that did.
        self._fill_rows_alone = False
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="aiolm-engine", daemon=True)
        self._totals = {"finished_requests": 0, "completion_tokens": 0}
        # With the flashinfer backend every pass plans on the host through page-locked
        # buffers, so no pass may be queued behind another (ModelRunner.queues_behind).
        wanted = config.overlap if config.overlap is not None else device.type == "cuda"
        self.overlap = wanted and self.runner.queues_behind(ForwardMode.DECODE)
        self._in_flight: _InFlight | None = None
        self._counters: tuple[int, ...] = ()
        self._publish_counters()

    # ------------------------------------------------------------ caller side
    def start(self) -> None:
        """Start the loop thread."""
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop thread to end (after :meth:`shutdown`); True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def statistics(self) -> EngineStatistics:
        """The engine as its last step left it (never waits): the loop publishes the raw
        counters after each step; the snapshot is built when asked."""
        (running, waiting, free, total, cached, evictable, protected, passes, retractions,
         hits, misses, finished, completion) = self._counters
        return EngineStatistics(
            running_requests=running, queued_requests=waiting, free_kv_slots=free,
            total_kv_slots=total, cached_kv_tokens=cached, evictable_kv_tokens=evictable,
            protected_kv_tokens=protected, forward_passes=passes, retractions=retractions,
            prompt_tokens=hits + misses, cached_tokens=hits,
            cache_hit_rate=hit_rate(hits, hits + misses), finished_requests=finished,
            completion_tokens=completion)

    def new_request(self, rid: str, input_ids: Sequence[int], sampling: SamplingParams, *,
                    matcher: Matcher | None = None, return_all_logits: bool = False,
                    max_prefix_match: int | None = None, prompt_logprobs: bool = False) -> Req:
        """Validate and build a request (runs on the caller's thread; touches no engine state).

        ``prompt_logprobs``: the request's first event carries the raw logprob of every
        prompt token given the tokens before it (with ``sampling.top_logprobs``
        alternatives); its prompt is then computed whole, not taken from the prefix cache.
        Raises ``ValueError`` for an empty prompt, out-of-range token ids or a
        ``logit_bias`` token outside the vocabulary, :class:`ContextLengthExceeded` /
        :class:`OutOfMemory` when the model's context / the KV pool could never hold it
        (:func:`~aiolm.engine.scheduler.check_fits`).
        """
        ids = list(input_ids)
        if not ids:
            raise ValueError("prompt: empty (give at least one token)")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(f"input_ids: token id {t!r} is not in [0, {self.vocab_size})")
        for t, _bias in sampling.logit_bias:
            if t >= self.vocab_size:
                raise ValueError(f"logit_bias: token id {t} is outside the model's vocabulary "
                                 f"({self.vocab_size} tokens)")
        check_fits(len(ids), sampling.max_tokens, context_len=self.context_len,
                   kv_slots=self.runner.allocator.size)
        detok = (self.tokenizer.detokenizer(ids, skip_special_tokens=sampling.skip_special_tokens)
                 if self.tokenizer is not None else None)
        checker = StopChecker(sampling, eos_token_ids=self.eos_token_ids, detokenizer=detok)
        state = _ReqState(checker=checker,
                          want_logprobs=bool(sampling.logprobs or sampling.top_logprobs),
                          prompt_logprobs=prompt_logprobs)
        if prompt_logprobs:
            return_all_logits, max_prefix_match = True, 0
        return Req(rid=rid, input_ids=ids, sampling=sampling, matcher=matcher,
                   return_all_logits=return_all_logits, max_prefix_match=max_prefix_match,
                   user_data=state)

    def add(self, req: Req) -> None:
        """Queue ``req`` (from :meth:`new_request`). Never blocks."""
        self._inbox.put(_Add(req))

    def abort(self, rid: str) -> None:
        """Abort request ``rid`` wherever it is; frees its slots. Never blocks."""
        self._inbox.put(_Abort(rid))

    def flush_cache(self, ticket: int) -> None:
        """Evict every unused cached prefix; replies ``CommandDone(ticket, freed_tokens)``."""
        self._inbox.put(_Flush(ticket))

    def check(self, ticket: int) -> None:
        """Check the KV accounting between two steps; replies ``CommandDone(ticket, value)``
        with an :class:`IntegrityReport`, or with the ``RuntimeError`` naming what is broken."""
        self._inbox.put(_Check(ticket))

    def shutdown(self) -> None:
        """Stop the loop after its current step; open requests end with ``"abort"``."""
        self._inbox.put(_Shutdown())

    def check_integrity(self) -> IntegrityReport:
        """Verify the KV accounting (on the loop thread, between steps).

        The radix cache's own invariants (``RadixCache.check_integrity``); every slot is
        exactly one of free, cached or held by a request, and every taken table row belongs
        to a running request; once idle, no slot is held by a request, no cached token is
        locked and no row is taken. Raises ``RuntimeError`` naming the broken invariant.
        """
        self.cache.check_integrity()
        allocator, rows = self.runner.allocator, self.runner.req_to_token_pool
        sched = self.scheduler.statistics()
        free, cached = allocator.available_size(), self.cache.total_size()
        report = IntegrityReport(
            idle=not self._live and sched.running == 0 and sched.waiting == 0,
            running_requests=sched.running, waiting_requests=sched.waiting, free_slots=free,
            cached_tokens=cached, request_slots=allocator.size - free - cached,
            locked_tokens=self.cache.protected_size(),
            rows_in_use=rows.max_requests - rows.available_size(),
        )
        free_list = allocator.free_slots()
        if free_list.unique().numel() != free_list.numel():
            raise RuntimeError("KV accounting: a KV slot is on the free list twice (a double free)")
        if report.request_slots < 0:
            raise RuntimeError(f"KV accounting: {free} free + {cached} cached slots exceed "
                               f"the pool's {allocator.size} (a slot freed twice?)")
        if report.rows_in_use != sched.running:
            raise RuntimeError(f"KV accounting: {report.rows_in_use} req_to_token rows are "
                               f"taken for {sched.running} running requests")
        if report.idle and (report.request_slots or report.locked_tokens):
            raise RuntimeError(
                f"KV accounting: idle, yet {report.request_slots} KV slots are held by no "
                f"request and {report.locked_tokens} cached tokens are still locked (leaked)")
        return report

    # -------------------------------------------------------------- the loop
    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while self._run_once():
                    pass
        except BaseException as exc:  # the loop is dead: tell every waiter
            _log.error("the engine loop failed; every open request is lost", exc_info=exc)
            self.failure = exc
            self._post([EngineFailed(error=exc)])

    def _run_once(self) -> bool:
        events: list[Event] = []
        idle = not self._live and self._in_flight is None
        commands = [self._inbox.get()] if idle else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        running = True
        for cmd in commands:
            running = self._handle(cmd, events) and running
        if not running:
            self._settle(events)
            for rid in list(self._live):
                self._abort(rid, events, BackendUnavailable("the engine was closed"))
            self._publish_counters()
            if events:
                self._post(events)
            return False
        batch = self.scheduler.schedule() if self._live else None
        if batch is not None and self.overlap:
            self._step_overlapped(batch, events)
        elif batch is not None:
            self._step(batch, events)
        else:
            self._settle(events)
        self._publish_counters()
        if events:
            self._post(events)
        return True

    def _handle(self, cmd: Any, events: list[Event]) -> bool:
        if isinstance(cmd, _Add):
            try:
                self.scheduler.add(cmd.req)
            except (ValueError, EngineError) as exc:
                events.append(RequestOutput(rid=cmd.req.rid, finish_reason="abort", error=exc))
            else:
                self._live[cmd.req.rid] = cmd.req
        elif isinstance(cmd, _Abort):
            self._abort(cmd.rid, events, None)
        elif isinstance(cmd, _Flush):
            events.append(CommandDone(ticket=cmd.ticket, value=self.scheduler.flush_cache()))
        elif isinstance(cmd, _Check):
            try:
                value: Any = self.check_integrity()
            except RuntimeError as exc:
                value = exc
            events.append(CommandDone(ticket=cmd.ticket, value=value))
        elif isinstance(cmd, _Shutdown):
            return False
        return True

    def _abort(self, rid: str, events: list[Event], error: BaseException | None) -> None:
        req = self._live.pop(rid, None)
        if req is None:
            return
        self.scheduler.abort(rid)
        req.finish_reason = "abort"
        self.runner.sampler.release(rid)
        events.append(RequestOutput(rid=rid, finish_reason="abort", usage=self._usage(req),
                                    error=error))

    def _step(self, batch: ScheduleBatch, events: list[Event]) -> None:
        """One step of the loop that does not overlap: compute ``batch``, then process it."""
        out = self.runner.run(batch, self._bitmask)
        self._process_step(batch, out, {}, events)

    def _step_overlapped(self, batch: ScheduleBatch, events: list[Event]) -> None:
        """Launch ``batch``, then process the step in flight while the device computes it.

        ``batch`` stays in flight unless it is :meth:`_serialized`. A pass that may not be
        queued behind another (``ModelRunner.queues_behind``: an extend planned by
        flashinfer) waits for the step in flight to be processed first; it holds no
        placeholder, and processing that step touches none of its requests.
        """
        if not self.runner.queues_behind(batch.mode):
            self._settle(events)
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
        self.scheduler.process_result(batch)
        for req in batch.reqs:
            if req.finish_reason is not None and self._live.pop(req.rid, None) is not None:
                self.runner.sampler.release(req.rid)
                totals = self._totals
                totals["finished_requests"] += 1
                totals["completion_tokens"] += req.num_outputs - req.pending

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
        texts = self._token_texts([*prompt, *(t for *_, top in scores for t, _ in top)])
        entries: list[TokenLogprob | None] = [None]
        for token, (lp, _, top) in zip(prompt[1:], scores, strict=True):
            entries.append(TokenLogprob(
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

    def _publish_counters(self) -> None:
        """Publish what :meth:`statistics` reports, as plain counters (one tuple: a reader
        on another thread sees one step's values or the next's, never a mix)."""
        cache = self.cache.statistics()
        running, waiting, retractions = self.scheduler.counts()
        self._counters = (
            running, waiting, self.runner.allocator.available_size(),
            self.runner.allocator.size, cache.total_size, cache.evictable_size,
            cache.protected_size, self.runner.forward_passes, retractions, cache.hit_tokens,
            cache.miss_tokens, self._totals["finished_requests"],
            self._totals["completion_tokens"])

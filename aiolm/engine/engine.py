"""The engine core: the synchronous scheduling/model loop on its own thread.

It knows token ids and text, not programs or chat roles. Commands arrive through an inbox
queue (add a request, abort one, flush the cache, shut down); each step of the loop:

1. drains the inbox;
2. asks the scheduler for a batch and the runner to compute it;
3. for each request that got a token: appends it (and any tokens a constraint forces:
   jump-forward), advances its constraint matcher, checks stop conditions, detokenizes;
4. hands the batch back to the scheduler (``process_result``);
5. posts *all* of the step's events to the async side in one call of ``post``.

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
from ..values import TokenLogprob, Usage
from .grammar_backend import GrammarBackend
from .request import Req
from .runner import ModelRunner, SampledToken
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
    """A snapshot of the engine, refreshed after every step.

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
        self._stats = EngineStatistics(total_kv_slots=self.runner.allocator.size,
                                       free_kv_slots=self.runner.allocator.available_size())

    # ------------------------------------------------------------ caller side
    def start(self) -> None:
        """Start the loop thread."""
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop thread to end (after :meth:`shutdown`); True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def statistics(self) -> EngineStatistics:
        """The snapshot taken after the last step (never waits)."""
        return self._stats

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
        commands = [self._inbox.get()] if not self._live else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        running = True
        for cmd in commands:
            running = self._handle(cmd, events) and running
        if not running:
            for rid in list(self._live):
                self._abort(rid, events, BackendUnavailable("the engine was closed"))
            self._refresh_stats()
            if events:
                self._post(events)
            return False
        batch = self.scheduler.schedule() if self._live else None
        if batch is not None:
            self._step(batch, events)
        self._refresh_stats()
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
        out = self.runner.run(batch, self._bitmask)
        for row, req in enumerate(batch.reqs):
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
        self.scheduler.process_result(batch)
        for req in batch.reqs:
            if req.finish_reason is not None and self._live.pop(req.rid, None) is not None:
                self.runner.sampler.release(req.rid)
                totals = self._totals
                totals["finished_requests"] += 1
                totals["completion_tokens"] += len(req.output_ids)

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
        return Usage(prompt_tokens=len(req.input_ids), completion_tokens=len(req.output_ids),
                     cached_tokens=req.cached_len)

    def _refresh_stats(self) -> None:
        sched = self.scheduler.statistics()
        cache = self.cache.statistics()
        self._stats = EngineStatistics(
            running_requests=sched.running,
            queued_requests=sched.waiting,
            free_kv_slots=self.runner.allocator.available_size(),
            total_kv_slots=self.runner.allocator.size,
            cached_kv_tokens=cache.total_size,
            evictable_kv_tokens=cache.evictable_size,
            protected_kv_tokens=cache.protected_size,
            forward_passes=self.runner.forward_passes,
            retractions=sched.retractions,
            prompt_tokens=cache.hit_tokens + cache.miss_tokens,
            cached_tokens=cache.hit_tokens,
            cache_hit_rate=cache.hit_rate,
            **self._totals,
        )

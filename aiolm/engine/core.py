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

The steps themselves (3-4, serial and overlapped) are :mod:`aiolm.engine.step_processing`;
the events, snapshots and commands are :mod:`aiolm.engine.events`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..cache.radix import RadixCache
from ..errors import BackendUnavailable, EngineError
from ..sampling import SamplingParams
from ..values import hit_rate
from .events import (
    CommandDone,
    EngineFailed,
    EngineStatistics,
    Event,
    IntegrityReport,
    RequestOutput,
    _Abort,
    _Add,
    _Check,
    _Flush,
    _Shutdown,
)
from .forward_batch import ForwardMode
from .grammar_backend import GrammarBackend
from .request import Req
from .runner import ModelRunner
from .scheduler import Scheduler, check_fits
from .step_processing import StepProcessing, _InFlight, _ReqState
from .stopping import StopChecker

if TYPE_CHECKING:
    from torch import nn

    from ..constraints.base import Matcher
    from .config import EngineConfig
    from .model_config import ModelConfig
    from .multimodal import MultimodalInputs
    from .tokenizer import Tokenizer
    from .tp_workers import TPWorkers

__all__ = ["CommandDone", "EngineCore", "EngineFailed", "EngineStatistics", "IntegrityReport",
           "RequestOutput"]

_log = logging.getLogger("aiolm.engine")


class EngineCore(StepProcessing):
    """The engine loop and the thread-safe calls into it.

    Construction builds the runner (KV memory) and scheduler; :meth:`start` starts the
    loop thread. :meth:`new_request` validates on the caller's thread; :meth:`add`,
    :meth:`abort`, :meth:`flush_cache` and :meth:`shutdown` only post to the inbox.
    ``failure`` is the error that stopped the loop (``None`` while it runs), set on the
    loop thread before the :class:`EngineFailed` event is posted. ``workers``: the
    tensor-parallel worker processes (rank 0's ``model`` is its shard); the core owns them
    from here on and stops them when its loop ends (or its construction fails).
    """

    def __init__(self, config: EngineConfig, *, model: nn.Module, model_config: ModelConfig,
                 tokenizer: Tokenizer | None, device: torch.device,
                 post: Callable[[list[Event]], None], workers: TPWorkers | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        eos = set(model_config.eos_token_ids)
        if tokenizer is not None:
            eos.update(tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self.runner = ModelRunner(config, model=model, model_config=model_config, device=device,
                                  eos_token_ids=sorted(eos),
                                  tp=workers.group if workers is not None else None,
                                  workers=workers)
        try:
            self._setup(config, model_config, device, post)
        except BaseException:
            self.runner.close()
            raise

    def _setup(self, config: EngineConfig, model_config: ModelConfig, device: torch.device,
               post: Callable[[list[Event]], None]) -> None:
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
            mix_decode=config.mix_decode,
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
                    max_prefix_match: int | None = None, prompt_logprobs: bool = False,
                    mm: MultimodalInputs | None = None) -> Req:
        """Validate and build a request (runs on the caller's thread; touches no engine state).

        ``prompt_logprobs``: the request's first event carries the raw logprob of every
        prompt token given the tokens before it (with ``sampling.top_logprobs``
        alternatives; ``None`` for an image's placeholders); its prompt is then computed
        whole, not taken from the prefix cache.
        ``mm``: the request's images (:func:`~aiolm.engine.multimodal.prepare_multimodal`),
        whose placeholder runs in ``input_ids`` hold their pad ids; their tokens count
        against the context like any other.
        Raises ``ValueError`` for an empty prompt, out-of-range token ids (a pad id outside
        its item's run) or a ``logit_bias`` token outside the vocabulary,
        :class:`ContextLengthExceeded` / :class:`OutOfMemory` when the model's context / the
        KV pool could never hold it (:func:`~aiolm.engine.scheduler.check_fits`).
        """
        ids = list(input_ids)
        if not ids:
            raise ValueError("prompt: empty (give at least one token)")
        pads = _pad_positions(mm, len(ids))
        for k, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                if k in pads and t == pads[k]:
                    continue
                raise ValueError(f"input_ids: token id {t!r} is not in [0, {self.vocab_size})")
        for t, _bias in sampling.logit_bias:
            if t >= self.vocab_size:
                raise ValueError(f"logit_bias: token id {t} is outside the model's vocabulary "
                                 f"({self.vocab_size} tokens)")
        check_fits(len(ids), sampling.max_tokens, context_len=self.context_len,
                   kv_slots=self.runner.allocator.size)
        text_ids = [t for t in ids if t < self.vocab_size] if pads else ids
        detok = (self.tokenizer.detokenizer(text_ids,
                                            skip_special_tokens=sampling.skip_special_tokens)
                 if self.tokenizer is not None else None)
        checker = StopChecker(sampling, eos_token_ids=self.eos_token_ids, detokenizer=detok)
        state = _ReqState(checker=checker,
                          want_logprobs=bool(sampling.logprobs or sampling.top_logprobs),
                          prompt_logprobs=prompt_logprobs)
        if prompt_logprobs:
            return_all_logits, max_prefix_match = True, 0
        return Req(rid=rid, input_ids=ids, sampling=sampling, matcher=matcher,
                   return_all_logits=return_all_logits, max_prefix_match=max_prefix_match,
                   user_data=state, mm=mm)

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
        finally:
            self.runner.close()

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


def _pad_positions(mm: MultimodalInputs | None, prompt_len: int) -> dict[int, int]:
    """Prompt index -> the pad id expected there, for ``mm``'s items; ValueError for an
    item outside the prompt."""
    if mm is None:
        return {}
    out: dict[int, int] = {}
    for item in mm.items:
        if item.offset < 0 or item.end > prompt_len or item.length < 1:
            raise ValueError(f"mm: a {item.kind} run {item.offset}..{item.end} lies outside "
                             f"the prompt of {prompt_len} tokens")
        out.update(dict.fromkeys(range(item.offset, item.end), item.pad_id))
    return out

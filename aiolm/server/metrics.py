"""The server's metrics, kept and rendered by ``prometheus_client`` (``GET /metrics``).

Each app has a registry of its own (two apps in one process do not share counts):

- counters: ``aiolm_requests_total{route,status}``, ``aiolm_prompt_tokens_total``,
  ``aiolm_completion_tokens_total``, ``aiolm_cached_tokens_total``;
- gauges: ``aiolm_requests_in_flight``, ``aiolm_pending_generations``, and, read from the
  backend at each scrape, ``aiolm_engine_up``, ``aiolm_cache_hit_rate``,
  ``aiolm_queue_depth`` and every number of ``backend.statistics()`` as
  ``aiolm_backend_<name>`` (a snapshot: whether a backend's number only grows is the
  backend's business, so each is exposed as a gauge);
- histograms (seconds, by route): ``aiolm_time_to_first_token_seconds`` (request received
  to a choice's first output), ``aiolm_inter_token_latency_seconds`` (between a choice's
  tokens: a piece carrying k token ids counts as k tokens, each after 1/k of the gap) and
  ``aiolm_request_latency_seconds`` (received to answered, requests answered 200).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..backends.base import Backend, Chunk, Usage
from ..values import hit_rate

__all__ = ["GenerationTimer", "Metrics"]

_log = logging.getLogger("aiolm.server")

# Backend statistics fields that mean "requests waiting to be scheduled".
_QUEUE_FIELDS = ("queue_depth", "queued_requests", "waiting", "num_waiting", "waiting_requests")
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The metrics of one app (mutated on the event loop only).

    ``in_flight`` (requests being answered) and ``pending`` (backend requests admitted and
    not done, which admission compares with its limit) are plain counts the app keeps; the
    gauges read them at each scrape. ``failure()`` is the error that stopped the backend's
    engine loop, or None while it serves.
    """

    def __init__(self, backend: Backend, failure: Callable[[], BaseException | None]) -> None:
        self.in_flight = 0
        self.pending = 0
        registry = self.registry = CollectorRegistry()
        self._requests = Counter("aiolm_requests", "HTTP requests answered, by route and status.",
                                 ["route", "status"], registry=registry)
        self._prompt_tokens = Counter("aiolm_prompt_tokens", "Prompt tokens of answered requests.",
                                      registry=registry)
        self._completion_tokens = Counter("aiolm_completion_tokens", "Generated tokens.",
                                          registry=registry)
        self._cached_tokens = Counter("aiolm_cached_tokens",
                                      "Prompt tokens served from the prefix cache.",
                                      registry=registry)
        Gauge("aiolm_requests_in_flight", "Requests being answered now.",
              registry=registry).set_function(lambda: self.in_flight)
        Gauge("aiolm_pending_generations",
              "Backend requests (one per choice or scored continuation) admitted and not done.",
              registry=registry).set_function(lambda: self.pending)
        self._ttft = Histogram("aiolm_time_to_first_token_seconds",
                               "Seconds from receiving a request to a choice's first output.",
                               ["route"], buckets=_TTFT_BUCKETS, registry=registry)
        self._itl = Histogram("aiolm_inter_token_latency_seconds",
                              "Seconds between two output tokens of one choice.",
                              ["route"], buckets=_ITL_BUCKETS, registry=registry)
        self._latency = Histogram("aiolm_request_latency_seconds",
                                  "Seconds from receiving a request to its whole answer (200s).",
                                  ["route"], buckets=_LATENCY_BUCKETS, registry=registry)
        registry.register(_BackendCollector(backend, failure, self))

    def count(self, route: str, status: int) -> None:
        """Count one answered request."""
        self._requests.labels(route, str(status)).inc()

    def add_usage(self, usage: Usage | None) -> None:
        """Count the tokens of one finished choice or scoring."""
        if usage is not None:
            self._prompt_tokens.inc(usage.prompt_tokens)
            self._completion_tokens.inc(usage.completion_tokens)
            self._cached_tokens.inc(usage.cached_tokens)

    def answered(self, route: str, started: float) -> None:
        """Observe the latency of a request received at ``started`` (``time.perf_counter()``)
        and answered 200 now."""
        self._latency.labels(route).observe(time.perf_counter() - started)

    def timer(self, route: str, started: float) -> GenerationTimer:
        """The timer of one choice of a request received at ``started``."""
        return GenerationTimer(ttft=self._ttft.labels(route), itl=self._itl.labels(route),
                               started=started)

    def tokens(self) -> tuple[float, float]:
        """(prompt tokens, of which cached) counted so far."""
        # NOTE: read from the counters themselves, not the registry: a registry read runs
        # every collector, the one calling this included.
        return _total(self._prompt_tokens), _total(self._cached_tokens)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text of every metric, and its content type. Never raises for a
        failed or closed backend: statistics it cannot give are left out."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@attrs.define(eq=False)
class GenerationTimer:
    """Times one choice's output: the first output chunk observes the time to first token,
    each later one the inter-token latency."""

    ttft: Histogram
    itl: Histogram
    started: float
    _last: float | None = attrs.field(default=None, init=False)

    def chunk(self, chunk: Chunk) -> None:
        """Take a chunk the backend streamed just now."""
        if not (chunk.text or chunk.token_ids or chunk.reasoning or chunk.tool_calls):
            return
        now = time.perf_counter()
        if self._last is None:
            self.ttft.observe(now - self.started)
        else:
            tokens = max(1, len(chunk.token_ids))
            for _ in range(tokens):
                self.itl.observe((now - self._last) / tokens)
        self._last = now


class _BackendCollector:
    """The gauges read from the backend at each scrape."""

    def __init__(self, backend: Backend, failure: Callable[[], BaseException | None],
                 metrics: Metrics) -> None:
        self._backend = backend
        self._failure = failure
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []   # names known only at a scrape; none clash with the app's own

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "aiolm_engine_up",
            "1 while the backend serves, 0 once its engine loop has stopped on an error.",
            value=int(self._failure() is None))
        stats = _backend_stats(self._backend)
        rate = stats.get("cache_hit_rate")
        if rate is None:
            prompt, cached = self._metrics.tokens()
            rate = hit_rate(cached, prompt)
        yield GaugeMetricFamily("aiolm_cache_hit_rate",
                                "Fraction of prompt tokens served from the cache.", value=rate)
        queue = next((stats[f] for f in _QUEUE_FIELDS if f in stats), None)
        if queue is not None:
            yield GaugeMetricFamily("aiolm_queue_depth", "Requests waiting to be scheduled.",
                                    value=queue)
        for name, value in sorted(stats.items()):
            yield GaugeMetricFamily(f"aiolm_backend_{name}", f"Backend statistic {name}.",
                                    value=value)


def _total(counter: Counter) -> float:
    """The value of an unlabelled counter."""
    [family] = counter.collect()
    return next(s.value for s in family.samples if s.name.endswith("_total"))


def _backend_stats(backend: Backend) -> dict[str, int | float]:
    """The numeric fields of ``backend.statistics()`` (empty if it has none)."""
    statistics = getattr(backend, "statistics", None)
    if not callable(statistics):
        return {}
    try:
        snapshot = statistics()
    except Exception as exc:  # a dead or closed engine has none; /metrics must still answer
        _log.debug("backend statistics unavailable: %r", exc)
        return {}
    if attrs.has(type(snapshot)):
        fields = attrs.asdict(snapshot, recurse=False)
    elif dataclasses.is_dataclass(snapshot) and not isinstance(snapshot, type):
        fields = {f.name: getattr(snapshot, f.name) for f in dataclasses.fields(snapshot)}
    elif isinstance(snapshot, dict):
        fields = snapshot
    else:
        fields = {k: v for k, v in vars(snapshot).items() if not k.startswith("_")}
    fields = dict(fields)
    for name in ("cache_hit_rate", *_QUEUE_FIELDS):  # often properties, not fields
        if name not in fields and isinstance(getattr(snapshot, name, None), int | float):
            fields[name] = getattr(snapshot, name)
    return {k: v for k, v in fields.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k.isidentifier()}

"""The server's counters, rendered in the Prometheus text format (``GET /metrics``)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter

import attrs

from ..backends.base import Backend, Usage

__all__ = ["Metrics"]

_log = logging.getLogger("aiolm.server")

# Backend statistics fields that mean "requests waiting to be scheduled".
_QUEUE_FIELDS = ("queue_depth", "queued_requests", "waiting", "num_waiting", "waiting_requests")


@attrs.define(eq=False)
class Metrics:
    """Request, token and in-flight counters of one app (mutated on the event loop only)."""

    requests: Counter[tuple[str, int]] = attrs.field(factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    in_flight: int = 0
    pending: int = 0     # backend requests admitted (one per choice or continuation), not done

    def count(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def add_usage(self, usage: Usage | None) -> None:
        if usage is not None:
            self.prompt_tokens += usage.prompt_tokens
            self.completion_tokens += usage.completion_tokens
            self.cached_tokens += usage.cached_tokens

    def render(self, backend: Backend, *, up: bool) -> str:
        """Prometheus exposition text: our counters, then the backend's ``statistics()``.

        ``up``: whether the backend serves (``aiolm_engine_up``). Never raises for a failed
        or closed backend: statistics it cannot give are left out.
        """
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

        metric("aiolm_requests_total", "counter", "HTTP requests answered, by route and status.",
               [(f'{{route="{r}",status="{s}"}}', v) for (r, s), v in sorted(self.requests.items())])
        metric("aiolm_engine_up", "gauge",
               "1 while the backend serves, 0 once its engine loop has stopped on an error.",
               [("", int(up))])
        metric("aiolm_requests_in_flight", "gauge", "Requests being answered now.",
               [("", self.in_flight)])
        metric("aiolm_pending_generations", "gauge",
               "Backend requests (one per choice or scored continuation) admitted and not done.",
               [("", self.pending)])
        metric("aiolm_prompt_tokens_total", "counter", "Prompt tokens of answered requests.",
               [("", self.prompt_tokens)])
        metric("aiolm_completion_tokens_total", "counter", "Generated tokens.",
               [("", self.completion_tokens)])
        metric("aiolm_cached_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
               [("", self.cached_tokens)])
        stats = _backend_stats(backend)
        rate = stats.get("cache_hit_rate")
        if rate is None:
            rate = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        metric("aiolm_cache_hit_rate", "gauge", "Fraction of prompt tokens served from the cache.",
               [("", rate)])
        queue = next((stats[f] for f in _QUEUE_FIELDS if f in stats), None)
        if queue is not None:
            metric("aiolm_queue_depth", "gauge", "Requests waiting to be scheduled.", [("", queue)])
        for name, value in sorted(stats.items()):
            metric(f"aiolm_backend_{name}", "gauge", f"Backend statistic {name}.", [("", value)])
        return "\n".join(lines) + "\n"


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


def _num(value: float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    return repr(float(value)) if isinstance(value, float) else str(value)

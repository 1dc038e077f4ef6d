"""How :class:`aiolm.Engine` shows itself: its ``repr`` and its notebook table
(private to ``backends.engine``)."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ..engine.core import EngineStatistics

__all__ = ["EngineView", "engine_html", "engine_repr"]


@attrs.frozen(kw_only=True)
class EngineView:
    """What an engine shows of itself, read once (never waits).

    ``state`` is ``"not started"``, ``"running"``, ``"closed"`` or ``"failed"``;
    ``statistics`` is set while running; ``failure`` when failed.
    """

    model: str
    device: str
    dtype: str
    attention_backend: str
    state: str
    statistics: EngineStatistics | None = None
    failure: BaseException | None = None


def engine_repr(view: EngineView) -> str:
    """One line: model, device, dtype, state and, while running, the KV pool's size."""
    slots = (f" kv_slots={view.statistics.total_kv_slots}"
             if view.statistics is not None else "")
    return (f"<aiolm.Engine model={view.model!r} device={view.device} dtype={view.dtype} "
            f"{view.state}{slots}>")


def engine_html(view: EngineView) -> str:
    """A small table: the engine's model and placement, its state and, while running, its
    request, token, cache and KV-slot figures."""
    rows = [("model", view.model), ("device", view.device), ("dtype", view.dtype),
            ("attention backend", view.attention_backend), ("state", view.state)]
    if view.failure is not None:
        rows.append(("error", f"{type(view.failure).__name__}: {view.failure}"))
    stats = view.statistics
    if stats is not None:
        used = stats.total_kv_slots - stats.free_kv_slots
        rows += [
            ("requests", f"{stats.running_requests} running, {stats.queued_requests} queued, "
                         f"{stats.finished_requests} finished"),
            ("tokens", f"{stats.prompt_tokens:,} prompt ({stats.cached_tokens:,} cached), "
                       f"{stats.completion_tokens:,} generated"),
            ("cache hit rate", f"{stats.cache_hit_rate:.1%}"),
            ("KV slots", f"{used:,} used of {stats.total_kv_slots:,} "
                         f"({stats.cached_kv_tokens:,} cached)"),
        ]
    body = "".join(
        f'<tr><th style="text-align:left;padding-right:1em">{escape(name)}</th>'
        f'<td style="text-align:left">{escape(value)}</td></tr>'
        for name, value in rows)
    return f"<table><caption>aiolm.Engine</caption>{body}</table>"

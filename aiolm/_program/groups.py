"""Unwrapping the exception groups task groups raise, so callers see a program's own error."""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import BackendError

__all__ = ["single_error"]


def single_error(group: BaseExceptionGroup) -> BaseException | None:
    """The one error ``group`` stands for (however deeply nested), or None.

    - One exception inside: that exception.
    - Several, all :class:`~aiolm.BackendError`\\ s of the same type: the first of them
      (depth first, in order). They are one failure of the shared backend (the engine
      died, the API is down) that every fork branch running at that moment saw.
    - Anything else (independent errors, or backend errors of different types): None; the
      caller re-raises the group as it is.
    """
    leaves = leaf_errors(group)
    first = next(leaves, None)
    if first is None:
        return None
    kind = type(first) if isinstance(first, BackendError) else None
    for other in leaves:
        if kind is None or type(other) is not kind:
            return None
    return first


def leaf_errors(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside ``exc``'s (nested) groups; ``exc`` itself when not a group."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaf_errors(inner)
    else:
        yield exc

"""Unwrapping the exception groups task groups raise, so callers see a program's own error."""

from __future__ import annotations

__all__ = ["single_error"]


def single_error(group: BaseExceptionGroup) -> BaseException | None:
    """The one exception inside ``group`` (however deeply nested), or None if there are more.

    A group with several errors is left for the caller to re-raise as it is.
    """
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
            if len(leaves) > 1:
                return None
    return leaves[0] if leaves else None

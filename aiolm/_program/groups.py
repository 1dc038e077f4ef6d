"""aiolm's one rule for the exception groups task groups raise (``run``, ``run_batch``,
``stream``, fork blocks and the server all apply it through :func:`program_error`).

- **One failure is raised as itself.** A group holding one error (however deeply nested)
  stands for that error; so does a group whose errors are all :class:`~aiolm.BackendError`\\ s
  of one type (one failure of the shared backend — the engine died, the API is down — that
  every fork branch running at that moment saw): the first of them is raised.
- **Several failures at once are raised as one flat** ``ExceptionGroup`` holding each of
  them (nested groups flattened, depth first, in order), so ``except* ValueError`` and
  ``eg.exceptions`` see the failures themselves however the forks were nested.
- **A group holding a cancellation** (or another ``BaseException`` that is not an
  ``Exception``) is raised as it is: the async library needs it to reach its cancel scope.

Which failures happen "at once" is up to the scheduler: a branch that fails cancels its
siblings, and a sibling that fails before that cancellation reaches it is a second failure.
Code that must handle both shapes uses ``except*``, which catches a bare error too.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import BackendError

__all__ = ["leaf_errors", "program_error"]


def program_error(group: BaseExceptionGroup) -> BaseException:
    """What to raise for ``group`` by the rule above (raise it outside the ``except`` block,
    so that it keeps its own traceback and no ``__context__`` points at the group)."""
    # The same error object reached through two tasks is one failure.
    leaves = list({id(leaf): leaf for leaf in leaf_errors(group)}.values())
    if len(leaves) == 1:
        return leaves[0]
    if not all(isinstance(leaf, Exception) for leaf in leaves):
        return group
    first = leaves[0]
    if isinstance(first, BackendError) and all(type(leaf) is type(first) for leaf in leaves):
        return first
    return ExceptionGroup(f"{len(leaves)} errors at once", leaves)


def leaf_errors(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside ``exc``'s (nested) groups; ``exc`` itself when not a group."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaf_errors(inner)
    else:
        yield exc

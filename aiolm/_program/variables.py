"""The variables of a :class:`~aiolm._program.state.ProgramState`: set by the ops that
make them, read finished (``s[name]``) or awaited (``await s.get(name)``), and the errors
that say where a missing one is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ..errors import UnknownVariable, VariableNotReady
from .context import GenerationMeta

if TYPE_CHECKING:
    from .fork import ForkGroup
    from .state import ProgramState

__all__ = ["VariableAwaitable", "VariablesMixin"]


class VariablesMixin:
    """The variable methods of :class:`~aiolm._program.state.ProgramState` (a mixin: the
    fields are the state's)."""

    __slots__ = ()

    if TYPE_CHECKING:  # the ProgramState fields these methods use
        error: BaseException | None
        _closed: bool
        _forks: list[ForkGroup] | None
        _fork_vars: dict[str, str] | None
        _vars: dict[str, Any]
        _meta: dict[str, Any]
        _own: dict[str, None] | None
        _pending: dict[str, int]
        _waiters: dict[str, anyio.Event] | None

    def _set(self, name: str, value: Any, meta: Any) -> None:
        self._vars[name] = value
        if meta is None:
            self._meta.pop(name, None)
        else:
            self._meta[name] = meta
        if self._own is not None:
            self._own[name] = None
        count = self._pending[name] - 1
        if count:
            self._pending[name] = count
            return
        del self._pending[name]
        if self._waiters is not None:
            waiter = self._waiters.pop(name, None)
            if waiter is not None:
                waiter.set()

    # ------------------------------------------------------------------ reading

    def get(self, name: str) -> VariableAwaitable:
        """``await s.get(name)``: wait until variable ``name`` is generated and return it.

        Waits only for that variable (and for a name enqueued several times, its last
        write). Raises ``UnknownVariable`` if ``name`` was never enqueued. Used without
        ``await`` (``if s.get("ok") == "no":``), the result raises ``TypeError`` at once
        instead of comparing an awaitable.
        """
        return VariableAwaitable(self, name)

    async def _get(self, name: str) -> Any:
        if name not in self._pending:
            await anyio.lowlevel.checkpoint_if_cancelled()
        while name in self._pending:
            if self._closed:
                raise self._unfinished(name)
            if self._waiters is None:
                self._waiters = {}
            waiter = self._waiters.get(name)
            if waiter is None:
                waiter = self._waiters[name] = anyio.Event()
            await waiter.wait()
        return self[name]

    def __getitem__(self, name: str) -> Any:
        """A finished variable. Raises ``VariableNotReady`` while it is being generated."""
        if name in self._pending:
            if self._closed:
                raise self._unfinished(name)
            raise VariableNotReady(
                f"variable {name!r} is still being generated; use `await s.get({name!r})` "
                "to wait for it"
            )
        if name in self._vars:
            return self._vars[name]
        if self.error is not None:  # the program failed before making it: say why
            raise self.error
        raise UnknownVariable(self._missing(name))

    def _missing(self, name: str) -> str:
        """Why this state has no variable ``name``: in the branches of a fork not joined,
        or of one joined with mode="concat", or never appended."""
        where = (self._fork_vars or {}).get(name)
        if where is None and any(name in group._names() for group in self._forks or ()):
            where = "unjoined"
        if where == "unjoined":
            return (f"variable {name!r} is in the fork's branches, not in this state yet: "
                    f"call forks.join() after the `async with s.fork(...)` block (then "
                    f"s[{name!r}] is a list, one value per branch), or read forks[i][{name!r}]")
        if where == "concat":
            return (f"variable {name!r} is in fork branches joined with join(mode='concat'), "
                    f"which merges their text, not their variables: read forks[i][{name!r}], "
                    "or join with mode='gather'")
        return f"no variable {name!r} was ever appended to this state"

    def _unfinished(self, name: str) -> VariableNotReady:
        return VariableNotReady(
            f"variable {name!r} was never finished: its program (or fork) failed or was cancelled"
        )

    def __contains__(self, name: object) -> bool:
        """True when ``name`` is a variable (finished or pending)."""
        return name in self._vars or name in self._pending

    def meta(self, name: str) -> GenerationMeta | list[GenerationMeta | None]:
        """How variable ``name`` was generated: finish reason, token counts, logprobs.

        A gathered fork variable has a list (one entry per branch). Raises like
        ``state[name]``, and ``UnknownVariable`` for a variable not made by gen/select.
        """
        self[name]  # noqa: B018 -- raises VariableNotReady / UnknownVariable
        try:
            return self._meta[name]
        except KeyError:
            raise UnknownVariable(
                f"variable {name!r} has no generation metadata (gen and select set it)"
            ) from None


class VariableAwaitable:
    """What :meth:`ProgramState.get` returns: awaiting it waits for the variable.

    Anything else done with it — comparing, testing its truth, formatting it — is a
    forgotten ``await`` (``s["ok"]`` habits from SGLang land here), so it raises at once.
    """

    __slots__ = ("_name", "_state")

    def __init__(self, state: ProgramState, name: str) -> None:
        self._state, self._name = state, name

    def __await__(self):
        return self._state._get(self._name).__await__()

    def _forgot(self, *_args: Any) -> Any:
        raise TypeError(f"s.get({self._name!r}) must be awaited: did you forget `await`? "
                        f"(`await s.get({self._name!r})`)")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _forgot
    __bool__ = __format__ = __iter__ = __len__ = __contains__ = __getitem__ = _forgot
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<awaitable s.get({self._name!r}): use `await`>"

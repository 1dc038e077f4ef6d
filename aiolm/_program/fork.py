"""``ForkGroup``: ``async with s.fork(n) as forks`` — branches of a state as a task group."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import anyio

from ..backends.base import GenerateRequest
from ..errors import ProgramError
from ..primitives import Expr
from .context import next_request_id
from .execute import PREFIX_SAMPLING
from .groups import program_error
from .ops import JOIN

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from .state import ProgramState

__all__ = ["ForkGroup"]

JoinMode = Literal["gather", "concat"]


class ForkGroup:
    """The branches of one fork: a task group (entered with ``async with``) and a sequence.

    ``forks[i]`` is branch ``i`` (a :class:`ProgramState`); ``forks += expr`` appends ``expr``
    to every branch, ``forks += lambda i: expr`` appends ``expr(i)`` to branch ``i``. After
    the block, ``forks.join()`` merges the branches into the parent state.
    """

    def __init__(self, parent: ProgramState, n: int) -> None:
        self._parent = parent
        self._n = n
        self._branches: list[ProgramState] = []
        self._tg: TaskGroup | None = None
        self._stage: Literal["new", "open", "done", "failed", "joined"] = "new"

    async def __aenter__(self) -> ForkGroup:
        if self._stage != "new":
            raise ProgramError("a fork group can be entered only once; call s.fork(n) again")
        parent = self._parent
        await parent.sync()
        if parent._closed:
            raise ProgramError("this state's program or fork block has ended")
        ctx = parent._run
        if self._n > 1 and (parent._items or parent._plain or parent._role is not None):
            await ctx.backend.prefill(
                GenerateRequest(
                    **parent._request_fields(for_gen=False), sampling=PREFIX_SAMPLING,
                    request_id=next_request_id(), session=ctx.session,
                )
            )
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._branches = [parent._branch(self._tg, i) for i in range(self._n)]
        self._stage = "open"
        if parent._forks is None:
            parent._forks = []
        parent._forks.append(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._tg is not None
        ok = False
        try:
            # Waits for every branch's stream task; an error cancels the siblings.
            suppress = bool(await self._tg.__aexit__(exc_type, exc, tb))
            ok = exc is None
            return suppress
        except BaseExceptionGroup as group:
            error = program_error(group)
        finally:
            for branch in self._branches:
                branch._closed = True
            self._stage = "done" if ok else "failed"
            parent = self._parent
            parent._forks.remove(self)  # type: ignore[union-attr]  # added on entry
            if parent._fork_vars is None:
                parent._fork_vars = {}
            # Names only: the parent must not keep the branches alive.
            parent._fork_vars.update(dict.fromkeys(self._names(), "unjoined"))
        raise error  # outside the handler: the error keeps its own traceback and cause

    # ------------------------------------------------------------------ the branches

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> ProgramState:
        """Branch ``index``. Raises ``TypeError`` for a variable name: a fork group holds
        branches, not variables."""
        if isinstance(index, str):
            raise TypeError(
                f"forks[{index!r}]: a fork group is indexed by branch number: read one "
                f"branch's variable with forks[0][{index!r}], or call forks.join() after the "
                f"`async with` block and read s[{index!r}] (a list, one value per branch)"
            )
        return self._open_branches()[index]

    def __setitem__(self, index: int, value: ProgramState) -> None:
        # ``forks[i] += expr`` stores back what ``__iadd__`` returned: the branch itself.
        if value is not self._open_branches()[index]:
            raise TypeError("fork branches cannot be replaced; append with forks[i] += expr")

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self._open_branches())

    def _open_branches(self) -> list[ProgramState]:
        if self._stage == "new":
            raise ProgramError("use the branches inside `async with s.fork(n) as forks:`")
        return self._branches

    def __iadd__(self, expr: object | Callable[[int], object]) -> ForkGroup:
        """Append ``expr`` to every branch, or ``expr(i)`` to branch ``i`` if it is callable."""
        branches = self._open_branches()
        if callable(expr) and not isinstance(expr, Expr | str):
            for i, branch in enumerate(branches):
                branch += expr(i)
        else:
            for branch in branches:
                branch += expr
        return self

    def _names(self) -> list[str]:
        """The variables the branches set or are generating, in order."""
        return list(dict.fromkeys(
            name for b in self._branches for name in (*(b._own or ()), *b._pending)))

    # ------------------------------------------------------------------ joining

    def join(self, mode: JoinMode = "gather") -> None:
        """Merge the finished branches into the parent state (call after the block).

        ``"gather"``: every variable set in a branch becomes a list in the parent, one entry
        per branch in order (``None`` where a branch did not set it); ``meta`` likewise.
        ``"concat"``: the text (and turns, images) each branch appended is appended to the
        parent, branch 0 first; variables are not merged.
        """
        if mode not in ("gather", "concat"):
            raise ValueError(f"mode: expected 'gather' or 'concat', got {mode!r}")
        if self._stage in ("new", "open"):
            raise ProgramError("call forks.join() after the `async with s.fork(...)` block")
        if self._stage == "failed":
            raise ProgramError("cannot join a fork whose block failed")
        if self._stage == "joined":
            raise ProgramError("this fork was already joined")
        self._stage = "joined"
        branches = self._branches
        fork_vars = self._parent._fork_vars
        assert fork_vars is not None  # set when the block ended
        for name in self._names():
            if mode == "concat":
                fork_vars[name] = "concat"
            else:
                fork_vars.pop(name, None)
        if mode == "concat":
            def concat(parent: ProgramState) -> None:
                for branch in branches:
                    for kind, arg, var in branch._entries(branch._base):
                        parent._replay(kind, arg, var)

            self._parent._enqueue([(JOIN, concat)], ())
            return
        names = list(dict.fromkeys(name for b in branches for name in b._own or ()))

        def gather(parent: ProgramState) -> None:
            for name in names:
                values: list[Any] = []
                metas: list[Any] = []
                for b in branches:
                    mine = name in (b._own or ())
                    values.append(b._vars[name] if mine else None)
                    metas.append(b._meta.get(name) if mine else None)
                parent._set(name, values, metas)

        self._parent._enqueue([(JOIN, gather)], names)

"""``ProgramState``: the text, turns and variables of one program (or one fork branch).

``s += expr`` compiles ``expr`` into ops and returns at once. Ops that only change text run
immediately when nothing is queued; the rest go to a queue that one stream task per state
(started on demand in the task group of the program or fork that owns the state) executes
in order. Readers wait for exactly what they need: ``await s.get(name)`` for one variable,
``await s.sync()`` for everything queued.

The state's content and how a backend sees it are in :mod:`.transcript`, its variables in
:mod:`.variables`; :class:`ProgramState` adds the queue, the blocks and the display.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import attrs

from ..backends.base import ImageData
from ..chat import Message
from ..errors import ProgramError
from . import execute
from .context import RunContext
from .ops import (
    ASYNC_KINDS,
    CALLS,
    CLOSE,
    GEN,
    IMAGE,
    JOIN,
    OPEN,
    SCOPE_BEGIN,
    SCOPE_END,
    SELECT,
    TEXT,
    TOOL,
    VIDEO,
    Op,
    compile_expr,
)
from .transcript import TranscriptMixin
from .variables import VariablesMixin

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ..tools.spec import ToolCall
    from .fork import ForkGroup

__all__ = ["ProgramState"]


@attrs.define(eq=False)
class ProgramState(TranscriptMixin, VariablesMixin):
    """The state a program appends to. Created by ``Program.run`` (and by ``fork``).

    ``error`` is set on states returned by ``run_batch`` whose program failed.
    """

    _run: RunContext = attrs.field(alias="run")
    _tg: TaskGroup | None = attrs.field(default=None, alias="task_group")
    _path: tuple[int, ...] = attrs.field(default=(), alias="path")
    error: BaseException | None = attrs.field(default=None, init=False)

    # content: finished turns / plain text, then the open plain text or open turn
    _items: list[Message | str] = attrs.field(init=False, factory=list)
    _plain: list[str] = attrs.field(init=False, factory=list)
    _role: str | None = attrs.field(init=False, default=None)
    _parts: list[str | ImageData] = attrs.field(init=False, factory=list)
    _calls: list[ToolCall] = attrs.field(init=False, factory=list)  # the open turn's
    _images: list[ImageData] = attrs.field(init=False, factory=list)
    # Whether a turn holds tool calls or results (text backends then render through the
    # chat layer, which knows the model's own tool syntax).
    _tooled: bool = attrs.field(init=False, default=False)
    # Every content change applied, in order (read it through ``_entries``): the text
    # itself for text no gen wrote, else ``(op kind, argument, variable)``, the variable
    # naming the gen/select that wrote a TEXT entry. var_scope reads its text from here, a
    # concat-join replays a branch's entries from ``_base`` (where the branch started), and
    # the notebook display renders it.
    # NOTE: plain text goes in as a str, not a tuple: one new tracked object per text
    # append makes the garbage collector cost run_batch about 10% (frontend_overhead.py).
    _history: list[str | tuple[int, Any, str | None]] = attrs.field(init=False, factory=list)
    _base: int = attrs.field(init=False, default=0)
    _scopes: list[tuple[str, int]] = attrs.field(init=False, factory=list)
    # So that a read of a variable only fork branches hold says where it is: the fork
    # blocks open on this state, and the variables of ended ones' branches ("unjoined", or
    # "concat" once joined so, which merges no variables). None until the first fork.
    _forks: list[ForkGroup] | None = attrs.field(init=False, default=None)
    _fork_vars: dict[str, str] | None = attrs.field(init=False, default=None)
    # variables
    _vars: dict[str, Any] = attrs.field(init=False, factory=dict)
    _meta: dict[str, Any] = attrs.field(init=False, factory=dict)
    _own: dict[str, None] | None = attrs.field(init=False, default=None)  # set here (branches)
    _pending: dict[str, int] = attrs.field(init=False, factory=dict)
    _waiters: dict[str, anyio.Event] | None = attrs.field(init=False, default=None)
    # the stream
    _queue: deque[Op] = attrs.field(init=False, factory=deque)
    _busy: bool = attrs.field(init=False, default=False)
    _idle: anyio.Event | None = attrs.field(init=False, default=None)
    _qrole: str | None = attrs.field(init=False, default=None)  # open role once the queue ran
    _closed: bool = attrs.field(init=False, default=False)

    # ------------------------------------------------------------------ appending

    def __iadd__(self, expr: object) -> ProgramState:
        """Enqueue ``expr`` (text, gen, select, image, a role, or a ``+`` of them); no wait.

        Raises ``TypeError`` for a value that is not an expr, ``ProgramError`` for a turn
        inside a turn, an image outside a turn, or a state whose program or fork has ended.
        """
        if type(expr) is str:
            self._enqueue([(TEXT, expr)] if expr else [], ())
        else:
            ops, names = compile_expr(expr, self._qrole)
            self._enqueue(ops, names)
        return self

    def _enqueue(self, ops: list[Op], names: tuple[str, ...] | list[str]) -> None:
        if self._closed:
            raise ProgramError(
                "this state's program or fork block has ended; append inside the program "
                "(for a branch: inside its `async with s.fork(...)` block)"
            )
        pending = self._pending
        for name in names:
            pending[name] = pending.get(name, 0) + 1
        if self._busy:
            self._queue.extend(ops)
            return
        # Nothing queued: text-only ops apply now, so s.text() sees them at once.
        for i, op in enumerate(ops):
            if op[0] in ASYNC_KINDS:
                self._queue.extend(ops[i:])
                self._busy = True
                assert self._tg is not None  # set while the state is open
                self._tg.start_soon(self._drain, name=f"aiolm stream {self._path}")
                return
            self._apply(op)

    async def _drain(self) -> None:
        queue = self._queue
        while queue:
            kind, arg = queue.popleft()
            if kind == GEN:
                await execute.run_gen(self, arg)
            elif kind == SELECT:
                await execute.run_select(self, arg)
            elif kind == IMAGE:
                await execute.run_image(self, arg)
            elif kind == VIDEO:
                await execute.run_video(self, arg)
            else:
                self._apply((kind, arg))
        # NOTE: only a successful drain wakes waiters; on an error (or cancellation) the
        # task group that owns this task cancels them, so they never see a half-run state.
        self._busy = False
        if self._idle is not None:
            self._idle.set()
            self._idle = None

    def _apply(self, op: Op) -> None:
        kind, arg = op
        if kind == TEXT:
            self._append_text(arg)
        elif kind == OPEN:
            self._open(arg)
        elif kind == CLOSE:
            self._close()
        elif kind == SCOPE_BEGIN:
            self._scopes.append((arg, len(self._history)))
        elif kind == SCOPE_END:
            name, start = self._scopes.pop()
            text = "".join(arg for kind, arg, _ in self._entries(start) if kind == TEXT)
            self._set(name, text, None)
        elif kind == JOIN:
            arg(self)
        elif kind == TOOL:
            self._tool_turn(arg)
        elif kind == CALLS:
            self._record_calls(arg)
        else:
            raise AssertionError(f"unknown op {kind}")

    # ------------------------------------------------------------------ waiting

    async def sync(self) -> None:
        """Wait until everything appended so far has run."""
        if not self._busy:
            await anyio.lowlevel.checkpoint_if_cancelled()
        while self._busy:
            if self._closed:
                raise ProgramError("this state's program failed or was cancelled before its queue ran")
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    # ------------------------------------------------------------------ blocks

    @contextlib.contextmanager
    def _turn(self, role: str) -> Iterator[ProgramState]:
        if self._qrole is not None:
            raise ProgramError(
                f"cannot start a {role} turn inside the open {self._qrole} turn; "
                f"close the {self._qrole} turn first"
            )
        self._enqueue([(OPEN, role)], ())
        self._qrole = role
        try:
            yield self
        finally:
            self._qrole = None
            if not self._closed:
                self._enqueue([(CLOSE, role)], ())

    def system(self) -> contextlib.AbstractContextManager[ProgramState]:
        """``with s.system(): s += ...`` — what is appended inside is one system turn."""
        return self._turn("system")

    def user(self) -> contextlib.AbstractContextManager[ProgramState]:
        """``with s.user(): s += ...`` — what is appended inside is one user turn."""
        return self._turn("user")

    def assistant(self) -> contextlib.AbstractContextManager[ProgramState]:
        """``with s.assistant(): s += gen(...)`` — one assistant turn."""
        return self._turn("assistant")

    @contextlib.contextmanager
    def var_scope(self, name: str) -> Iterator[ProgramState]:
        """``with s.var_scope("x"): s += ...`` — the text appended inside becomes ``s["x"]``.

        The variable holds the appended text and generated text, without chat-template
        markup. It is pending (``await s.get("x")``) until the block's last expr has run.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name: expected a non-empty str, got {name!r}")
        self._enqueue([(SCOPE_BEGIN, name)], (name,))
        try:
            yield self
        finally:
            if not self._closed:
                self._enqueue([(SCOPE_END, name)], ())

    def fork(self, n: int) -> ForkGroup:
        """``async with s.fork(n) as forks:`` — ``n`` branches, each a copy of this state.

        The block is a task group: each branch's exprs run on its own task; leaving the block
        waits for every branch, and an error in one cancels the others and propagates. A fork
        of ``n > 1`` first asks the backend to prefill (cache) the shared prefix once.
        Afterwards, ``forks.join()`` merges the branches into this state.
        """
        from .fork import ForkGroup

        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n: expected an int, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"n: a fork needs at least 1 branch, got {n}")
        return ForkGroup(self, n)

    def _branch(self, tg: TaskGroup, index: int) -> ProgramState:
        """A copy of this (synced) state owned by task group ``tg``."""
        child = ProgramState(run=self._run, task_group=tg, path=(*self._path, index))
        child._items = list(self._items)
        child._plain = list(self._plain)
        child._role = child._qrole = self._role
        child._parts = list(self._parts)
        child._calls = list(self._calls)
        child._tooled = self._tooled
        child._images = list(self._images)
        child._vars = dict(self._vars)
        child._meta = dict(self._meta)
        child._own = {}
        child._history = list(self._history)
        child._base = len(child._history)
        return child

    def _status(self) -> str:
        """``"running"`` while the program (or fork block) runs, ``"done"`` after it ran
        everything appended, ``"failed"`` when it failed or was cancelled (``error`` set, or
        variables left unfinished)."""
        if self.error is not None:
            return "failed"
        if not self._closed:
            return "running"
        return "failed" if self._pending else "done"

    def _summary(self) -> str:
        words = [self._run.program or "program"]
        if self._path:
            words.append(f"branch {'.'.join(map(str, self._path))}")
        words.append(self._status())
        if self._pending:
            words.append(f"pending: {', '.join(self._pending)}")
        words.append(f"{len(self.text())} chars")
        return " · ".join(words)

    def __repr__(self) -> str:
        """Short: the program, the branch, the status, the variables and the text's length."""
        where = f" branch={self._path}" if self._path else ""
        pending = f" pending={list(self._pending)}" if self._pending else ""
        error = f" error={type(self.error).__name__}" if self.error is not None else ""
        return (f"<ProgramState {self._run.program or 'program'}{where} {self._status()} "
                f"vars={list(self._vars)}{pending}{error} text={len(self.text())} chars>")

    def _repr_html_(self) -> str:
        """The state in a notebook: its text (HTML-escaped), each generated variable's text
        highlighted with the variable's name as its tooltip, chat turns as labelled blocks,
        and a failed state's error."""
        from .display import state_html

        return state_html(summary=self._summary(), history=self._entries(),
                          variables=list(self._vars), error=self.error)

"""``ProgramState``: the text, turns and variables of one program (or one fork branch).

``s += expr`` compiles ``expr`` into ops and returns at once. Ops that only change text run
immediately when nothing is queued; the rest go to a queue that one stream task per state
(started on demand in the task group of the program or fork that owns the state) executes
in order. Readers wait for exactly what they need: ``await s.get(name)`` for one variable,
``await s.sync()`` for everything queued.
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
from ..chat import (
    ImagePart,
    Message,
    TextPart,
    as_text_turn,
    messages_to_openai,
    render_conversation,
)
from ..errors import ProgramError, UnknownVariable, UnsupportedFeature, VariableNotReady
from . import execute
from .context import GenerationMeta, RunContext
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
    Op,
    compile_expr,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from ..primitives import ToolResult
    from ..tools.spec import ToolCall
    from .fork import ForkGroup

__all__ = ["ProgramState"]


@attrs.define(eq=False)
class ProgramState:
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

    # ------------------------------------------------------------------ content (sync)

    def _append_text(self, text: str, var: str | None = None) -> None:
        """Append ``text``; ``var``: the gen/select variable that generated it."""
        if self._role is None:
            self._plain.append(text)
        else:
            self._parts.append(text)
        self._history.append(text if var is None else (TEXT, text, var))

    def _append_image(self, image: ImageData) -> None:
        if self._role is None:
            raise ProgramError("image() must be inside a turn")
        self._parts.append(image)
        self._images.append(image)
        self._history.append((IMAGE, image, None))

    def _open(self, role: str) -> None:
        if self._role is not None:
            raise ProgramError(f"cannot start a {role} turn inside the open {self._role} turn")
        if self._plain:
            self._items.append("".join(self._plain))
            self._plain.clear()
        self._role = role
        self._parts = []
        self._calls = []
        self._history.append((OPEN, role, None))

    def _close(self) -> None:
        role = self._role
        if role is None:
            raise ProgramError("no turn is open")
        self._items.append(self._open_turn())
        self._role = None
        self._parts = []
        self._calls = []
        self._history.append((CLOSE, role, None))

    def _open_turn(self) -> Message:
        return Message(role=self._role, parts=_to_parts(self._parts),  # type: ignore[arg-type]
                       tool_calls=tuple(self._calls))

    def _record_calls(self, calls: tuple[ToolCall, ...], var: str | None = None) -> None:
        """Record the tool calls a gen (of variable ``var``) made in the open assistant turn."""
        self._calls.extend(calls)
        self._tooled = True
        self._history.append((CALLS, calls, var))

    def _tool_turn(self, result: ToolResult) -> None:
        """Append a ``tool`` turn answering call ``result.call_id`` of the last assistant turn.

        Raises ``ProgramError`` inside a turn, or when no such call was made.
        """
        if self._role is not None:
            raise ProgramError(f"tool_result() is a turn of its own: append it after the "
                               f"{self._role} turn, not inside it")
        last = next((it for it in reversed(self._items)
                     if isinstance(it, Message) and it.role != "tool"), None)
        ids = [c.id for c in last.tool_calls] if last is not None else []
        if result.call_id not in ids:
            made = ", ".join(repr(i) for i in ids) or "none"
            raise ProgramError(f"tool_result: no call {result.call_id!r} in the last assistant "
                               f"turn (its calls: {made}); answer the calls of "
                               "gen(..., tools=...) right after its turn")
        if self._plain:
            self._items.append("".join(self._plain))
            self._plain.clear()
        self._items.append(Message(role="tool", parts=(TextPart(text=result.content),),
                                   tool_call_id=result.call_id))
        self._tooled = True
        self._history.append((TOOL, result, None))

    def _entries(self, start: int = 0) -> Iterator[tuple[int, Any, str | None]]:
        """The content changes from ``_history[start]`` on, as ``(kind, argument, variable)``."""
        for entry in self._history[start:]:
            yield (TEXT, entry, None) if type(entry) is str else entry  # type: ignore[misc]

    def _replay(self, kind: int, arg: Any, var: str | None) -> None:
        """Apply an entry of another state's history (a concat-join of a branch)."""
        if kind == IMAGE:
            self._append_image(arg)
        elif kind == TEXT:
            self._append_text(arg, var)
        elif kind == CALLS:
            self._record_calls(arg, var)
        else:
            self._apply((kind, arg))

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

    def text(self) -> str:
        """The whole text so far, as a text backend sees it (roles through its chat
        template; the scripted template for chat backends; tool calls and results in the
        Hermes form, see :func:`aiolm.chat.as_text_turn`). Queued exprs are not in it."""
        return str(self._prompt())

    def _prompt(self) -> str:
        """:meth:`text` as a text backend's prompt: a ``MarkedText`` marking message content
        (see :mod:`aiolm.chat`) once there are turns."""
        items = self._items
        if self._plain:
            items = [*items, "".join(self._plain)]
        open_parts: tuple[TextPart | ImagePart, ...] = ()
        if self._role is not None:
            open_parts = as_text_turn(self._open_turn()).parts if self._calls else _to_parts(self._parts)
        return render_conversation(items, self._run.template, open_role=self._role,
                                   open_text=open_parts)

    def messages(self) -> list[dict[str, Any]]:
        """The chat turns so far (the open turn last), in the OpenAI format the ``openai``
        client takes as is: ``{"role", "content"}`` (the text, or text and ``image_url``
        parts; None for an assistant turn with only calls), plus ``tool_calls`` on an
        assistant turn that made calls and ``tool_call_id`` on a ``tool`` turn. Text outside
        turns is not a message. Queued exprs are not in it."""
        return messages_to_openai(self._turns())

    def _turns(self) -> list[Message]:
        """The chat turns so far as :class:`aiolm.Message` objects (the open turn last)."""
        out = [it for it in self._items if isinstance(it, Message)]
        if self._role is not None:
            out.append(self._open_turn())
        return out

    def _request_fields(self, *, for_gen: bool, chat: bool = False) -> dict[str, Any]:
        """The prompt part of a ``GenerateRequest`` for what this state holds now.

        ``chat``: the request goes through the chat layer (tools, reasoning, tool turns),
        which needs messages on every backend. Raises ``UnsupportedFeature`` (a chat
        backend) or ``ProgramError`` (the chat layer) when a gen is not inside an assistant
        turn or text stands outside the turns.
        """
        ctx = self._run
        if not (ctx.chat or chat):
            return {"prompt": self._prompt(), "images": tuple(self._images)}
        if for_gen:
            if ctx.chat:
                error: type[Exception] = UnsupportedFeature
                why = f"{ctx.backend.model_name} is a chat backend"
            else:
                error, why = ProgramError, "tools, reasoning and tool turns make a chat"
            if self._role != "assistant":
                raise error(f"{why}: put gen/select inside an assistant turn, e.g. "
                            "s += assistant(gen('answer'))")
            if any(isinstance(it, str) and it.strip() for it in self._items):
                raise error(f"{why}: the model cannot see text outside a turn; wrap it in "
                            "system(...) or user(...)")
        return {"messages": tuple(self._turns())}

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


def _to_parts(raw: list[str | ImageData]) -> tuple[TextPart | ImagePart, ...]:
    parts: list[TextPart | ImagePart] = []
    run: list[str] = []
    for p in raw:
        if type(p) is str:
            run.append(p)
            continue
        if run:
            parts.append(TextPart(text="".join(run)))
            run = []
        parts.append(ImagePart(image=p))  # type: ignore[arg-type]
    if run:
        parts.append(TextPart(text="".join(run)))
    return tuple(parts)


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

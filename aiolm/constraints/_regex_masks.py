"""Masks of a regex constraint kept per automaton state, across requests.

A regex constraint is one lexeme: its mask after some output depends only on the state of
the pattern's automaton there, and a pattern has few states (the regex workload of
``benchmarks/constraint_masks.py`` passes through the same few dozen on every output). The
costly masks — the first letter of a ``[a-z]{1,11}`` name, the start of an e-mail address
after ``mail `` — are computed by llguidance once per state and then copied (a memcpy of
``vocab / 8`` bytes) for every later request with the same pattern and tokenizer.

The state is found here, not inside llguidance (which does not expose it): the pattern's
Python parse tree becomes a Thompson NFA, and a state is the set of NFA positions after the
output so far, so two outputs with the same set have the same future and so the same mask.
Only ASCII output is tracked (where Python's and Rust's classes agree; past the first other
byte a request computes its masks itself), and patterns with flags or constructs outside
plain regular expressions are not cached at all.

The cache holds only what llguidance computed for a state, never a matcher or its lexer: a
matcher that fails stores nothing, and every request still compiles its own grammar (and
checks every token it advances through llguidance, so a mask copied here could never let
an invalid token through).
"""

from __future__ import annotations

import re
import re._constants as _c  # type: ignore[import-not-found]
import re._parser as _p  # type: ignore[import-not-found]
import threading
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["RegexMasks", "regex_masks"]

_MAX_NODES = 20_000  # NFA positions (bounded repeats are unrolled)
_MAX_BYTES = 8 << 20  # masks kept per pattern and tokenizer (1,365 of a 49k vocabulary)
_TRACKED = frozenset(b"\t\n\r") | frozenset(range(0x20, 0x7F))
_FLAGS = re.UNICODE | re.VERBOSE | re.DOTALL  # those the NFA reproduces

_CATEGORIES: dict[Any, Callable[[str], bool]] = {
    _c.CATEGORY_DIGIT: str.isdecimal,
    _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _c.CATEGORY_SPACE: str.isspace,
    _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    _c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
    _c.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_"),
}


class _Unsupported(Exception):
    pass


class _Nfa:
    """Thompson NFA: node ``i`` is ``("char", predicate, next)``, ``("split", targets)`` or
    ``("match",)``; built back to front from the parse tree."""

    def __init__(self, dotall: bool) -> None:
        self.nodes: list[list[Any]] = [["match"]]
        self.dotall = dotall

    def add(self, node: list[Any]) -> int:
        if len(self.nodes) >= _MAX_NODES:
            raise _Unsupported
        self.nodes.append(node)
        return len(self.nodes) - 1

    def seq(self, items: list[Any], nxt: int) -> int:
        for op, av in reversed(items):
            nxt = self.one(op, av, nxt)
        return nxt

    def one(self, op: Any, av: Any, nxt: int) -> int:
        if op == _c.LITERAL:
            return self.add(["char", (lambda c: lambda ch: ch == c)(chr(av)), nxt])
        if op == _c.NOT_LITERAL:
            return self.add(["char", (lambda c: lambda ch: ch != c)(chr(av)), nxt])
        if op == _c.ANY:
            any_char = (lambda ch: True) if self.dotall else (lambda ch: ch != "\n")
            return self.add(["char", any_char, nxt])
        if op == _c.IN:
            return self.add(["char", _class(av), nxt])
        if op == _c.BRANCH:
            return self.add(["split", [self.seq(list(alt), nxt) for alt in av[1]]])
        if op == _c.SUBPATTERN:
            _, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise _Unsupported
            return self.seq(list(sub), nxt)
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            low, high, sub = av
            sub = list(sub)
            if high == _c.MAXREPEAT:
                loop = self.add(["split", []])
                self.nodes[loop][1] = [self.seq(sub, loop), nxt]
                tail = loop
            else:
                tail = nxt
                for _ in range(high - low):
                    tail = self.add(["split", [self.seq(sub, tail), nxt]])
            for _ in range(low):
                tail = self.seq(sub, tail)
            return tail
        if op == _c.AT:  # only at the pattern's edges (checked by _pyregex): no width
            return nxt
        raise _Unsupported


def _class(items: list[Any]) -> Callable[[str], bool]:
    negate = False
    tests: list[Callable[[str], bool]] = []
    for op, av in items:
        if op == _c.NEGATE:
            negate = True
        elif op == _c.LITERAL:
            tests.append((lambda c: lambda ch: ch == c)(chr(av)))
        elif op == _c.RANGE:
            tests.append((lambda lo, hi: lambda ch: lo <= ord(ch) <= hi)(*av))
        elif op == _c.CATEGORY and av in _CATEGORIES:
            tests.append(_CATEGORIES[av])
        else:
            raise _Unsupported
    if negate:
        return lambda ch: not any(t(ch) for t in tests)
    return lambda ch: any(t(ch) for t in tests)


class RegexMasks:
    """The automaton states of one pattern and the masks llguidance computed for them (for
    one tokenizer). Used by the engine thread; its memo tables only grow, by values that
    depend on nothing but the pattern (a lock guards the masks against several engines)."""

    def __init__(self, nfa: _Nfa, start: int) -> None:
        self._nfa = nfa
        self._ids: dict[frozenset[int], int] = {}
        self._sets: list[frozenset[int]] = []
        self._moves: dict[tuple[int, str], int | None] = {}
        self._masks: dict[int, bytes] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.start = self._intern(self._closure({start}))

    def _closure(self, nodes: set[int]) -> frozenset[int]:
        out: set[int] = set()
        stack = list(nodes)
        while stack:
            n = stack.pop()
            if n in out:
                continue
            out.add(n)
            node = self._nfa.nodes[n]
            if node[0] == "split":
                stack.extend(node[1])
        return frozenset(n for n in out if self._nfa.nodes[n][0] != "split")

    def _intern(self, nodes: frozenset[int]) -> int:
        state = self._ids.get(nodes)
        if state is None:
            state = self._ids[nodes] = len(self._sets)
            self._sets.append(nodes)
        return state

    def step(self, state: int | None, data: bytes) -> int | None:
        """The state after ``data`` (a token's bytes) from ``state``; None once the output
        leaves what is tracked (a byte outside printable ASCII) or the automaton."""
        if state is None or not _TRACKED.issuperset(data):
            return None
        with self._lock:
            return self._step(state, data)

    def _step(self, state: int | None, data: bytes) -> int | None:
        for ch in data.decode("ascii"):
            key = (state, ch)
            if key in self._moves:
                state = self._moves[key]
            else:
                nodes = self._nfa.nodes
                targets = {nodes[n][2] for n in self._sets[state]
                           if nodes[n][0] == "char" and nodes[n][1](ch)}
                state = self._intern(self._closure(targets)) if targets else None
                self._moves[key] = state
            if state is None:
                return None
        return state

    def mask(self, state: int | None) -> bytes | None:
        """The mask kept for ``state``, or None."""
        return None if state is None else self._masks.get(state)

    def keep(self, state: int | None, mask: bytes) -> None:
        """Keep llguidance's ``mask`` for ``state`` (until the pattern's budget is spent)."""
        if state is None:
            return
        with self._lock:
            if state not in self._masks and self._bytes + len(mask) <= _MAX_BYTES:
                self._masks[state] = mask
                self._bytes += len(mask)


def regex_masks(pattern: str) -> RegexMasks | None:
    """A fresh :class:`RegexMasks` of ``pattern`` (Python syntax, already checked by
    :func:`aiolm.constraints._pyregex.to_rust_regex`), or None when its states are not
    tracked (flags, ``regex``-module syntax, very large unrolled repeats)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            parsed = _p.parse(pattern)
    except re.error:
        return None
    if parsed.state.flags & ~_FLAGS:
        return None
    nfa = _Nfa(dotall=bool(parsed.state.flags & re.DOTALL))
    try:
        start = nfa.seq(list(parsed), 0)
    except _Unsupported:
        return None
    return RegexMasks(nfa, start)

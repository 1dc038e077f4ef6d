"""Where the cache-aware router sends a request: the decision, without Ray.

In order:

1. **Session**: a program's requests (one ``run``, forks included) carry a session key;
   while the replica its first request went to has room (at most ``imbalance`` requests
   more than the least-loaded replica), they follow it there: its cache holds what the
   program computed so far, even before that replica's events reach the index.
2. **Prefix**: the replica holding the longest prefix of the request's blocks, unless its
   load exceeds the least-loaded replica's by more than ``imbalance``; ties go to the less
   loaded one.
3. **Least loaded** otherwise (no replica holds a block of it, or the holder is too busy:
   the request *spills*).

The answer is Ray Serve's: ranks of replica ids, most preferred first; Serve tries the
first rank, then the next, skipping replicas whose queue is full.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import attrs

__all__ = ["Decision", "RoutingPolicy"]


@attrs.frozen(kw_only=True)
class Decision:
    """The ranks to try, and why the first was chosen (``session``, ``prefix`` or
    ``least-loaded``), with the number of matched blocks there."""

    ranks: tuple[tuple[str, ...], ...]
    reason: str
    matched_blocks: int = 0


def _nonnegative(_inst: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name}: must be at least 0 (got {value})")


def _positive(_inst: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name}: must be at least 1 (got {value})")


@attrs.define(eq=False)
class RoutingPolicy:
    """The cache-aware routing decision (see the module's docstring) and the sessions' homes.

    ``imbalance``: how many more requests than the least-loaded replica a replica may run
    and still get a request for its cache (or its session). ``max_sessions`` bounds the
    remembered sessions (least recently used forgotten first).
    """

    imbalance: int = attrs.field(default=4, validator=_nonnegative)
    max_sessions: int = attrs.field(default=65536, validator=_positive)
    _sessions: collections.OrderedDict[str, str] = attrs.field(
        factory=collections.OrderedDict, init=False)

    def decide(self, candidates: Sequence[str], *, matched: Mapping[str, int],
               load: Mapping[str, int], session: str | None = None) -> Decision:
        """Rank ``candidates`` (replica ids) for one request: ``matched`` gives the leading
        blocks of the request each replica holds, ``load`` its requests in flight (missing:
        0), ``session`` the request's session key. Raises ``ValueError`` for no candidates."""
        if not candidates:
            raise ValueError("candidates: no replica to route to")
        by_load = sorted(candidates, key=lambda r: load.get(r, 0))
        floor = load.get(by_load[0], 0)

        def ranked(first: str, reason: str, blocks: int = 0) -> Decision:
            rest = tuple(r for r in by_load if r != first)
            return Decision(ranks=((first,), rest) if rest else ((first,),), reason=reason,
                            matched_blocks=blocks)

        home = self._sessions.get(session) if session is not None else None
        if home in candidates and load.get(home, 0) - floor <= self.imbalance:
            self._sessions.move_to_end(session)
            return ranked(home, "session", matched.get(home, 0))
        best = max(by_load, key=lambda r: matched.get(r, 0))  # stable: the least loaded on ties
        blocks = matched.get(best, 0)
        if blocks and load.get(best, 0) - floor <= self.imbalance:
            return ranked(best, "prefix", blocks)
        return ranked(by_load[0], "least-loaded", matched.get(by_load[0], 0))

    def routed(self, session: str | None, replica: str) -> None:
        """Remember that ``session``'s request went to ``replica`` (its home from now on)."""
        if session is None:
            return
        self._sessions[session] = replica
        self._sessions.move_to_end(session)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    def forget_replica(self, replica: str) -> None:
        """Drop the sessions whose home was ``replica`` (it stopped or died)."""
        for session in [s for s, r in self._sessions.items() if r == replica]:
            del self._sessions[session]

"""Where the cache-aware router sends a request: the decision, without Ray.

A replica has *room* while it runs at most ``imbalance`` requests more than the
least-loaded replica (requests in flight). In order:

1. **Session**: a program's requests (one ``run``, forks included) carry a session key;
   while the replica its first request went to has room, they follow it there: its cache
   holds what the program computed so far, even before that replica's events reach the
   index.
2. **Prefix**: the replica holding the longest prefix of the request's blocks, if it has
   room. Where several replicas hold that longest prefix, or none holds a block of it (a
   *new prefix*), the request is *placed*: on the one with room that received the fewest
   of the last ``window`` placements, then the least loaded. A placement counts when it is
   decided, so that a burst decided before any of it reaches a replica spreads too.
3. **Spill**: the holder of the longest prefix has no room: the least-loaded replica (on
   ties, the one with fewer recent placements).

Why placements balance by a count and not by the requests in flight: with affinity, where
a prefix is first placed decides where all its later requests go, so the load that matters
is the prefixes each replica owns. The requests in flight at that instant are a coin toss
(with 4 in flight over 2 replicas, 8 new prefixes placed on the less busy one split 5/3 as
often as 4/4) and leave one replica with more of the work for as long as the prefixes live.

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
    ``least-loaded``: a new prefix placed, or a spill), with the number of matched blocks
    there. ``placed``: the first rank was chosen as a placement (see the module's
    docstring), and counted as one."""

    ranks: tuple[tuple[str, ...], ...]
    reason: str
    matched_blocks: int = 0
    placed: bool = False


def _nonnegative(_inst: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name}: must be at least 0 (got {value})")


def _positive(_inst: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name}: must be at least 1 (got {value})")


@attrs.define(eq=False)
class RoutingPolicy:
    """The cache-aware routing decision (see the module's docstring), the sessions' homes
    and the recent placements.

    ``imbalance``: how many more requests than the least-loaded replica a replica may run
    and still get a request for its cache, its session or a placement. ``window``: how many
    of the latest placements count when placing the next one. ``max_sessions`` bounds the
    remembered sessions (least recently used forgotten first).
    """

    imbalance: int = attrs.field(default=4, validator=_nonnegative)
    window: int = attrs.field(default=64, validator=_positive)
    max_sessions: int = attrs.field(default=65536, validator=_positive)
    _sessions: collections.OrderedDict[str, str] = attrs.field(
        factory=collections.OrderedDict, init=False)
    _placements: collections.deque[str] = attrs.field(init=False)
    _placed: collections.Counter[str] = attrs.field(factory=collections.Counter, init=False)

    @_placements.default
    def _no_placements(self) -> collections.deque[str]:
        return collections.deque(maxlen=self.window)

    def decide(self, candidates: Sequence[str], *, matched: Mapping[str, int],
               load: Mapping[str, int], session: str | None = None) -> Decision:
        """Rank ``candidates`` (replica ids) for one request: ``matched`` gives the leading
        blocks of the request each replica holds, ``load`` its requests in flight (missing:
        0), ``session`` the request's session key. Counts a placement (see
        :meth:`withdraw`) and refreshes the session's recency. Raises ``ValueError`` for no
        candidates."""
        if not candidates:
            raise ValueError("candidates: no replica to route to")
        by_load = sorted(candidates, key=lambda r: load.get(r, 0))
        floor = load.get(by_load[0], 0)

        def has_room(replica: str) -> bool:
            return load.get(replica, 0) - floor <= self.imbalance

        def ranked(first: str, reason: str, *, placed: bool = False) -> Decision:
            rest = tuple(r for r in by_load if r != first)
            return Decision(ranks=((first,), rest) if rest else ((first,),), reason=reason,
                            matched_blocks=matched.get(first, 0), placed=placed)

        home = self._sessions.get(session) if session is not None else None
        if home in candidates and has_room(home):
            self._sessions.move_to_end(session)
            return ranked(home, "session")
        blocks = max(matched.get(r, 0) for r in candidates)
        holders = [r for r in by_load if matched.get(r, 0) == blocks]  # all of them for 0
        roomy = [r for r in holders if has_room(r)]
        reason = "prefix" if blocks else "least-loaded"
        if len(roomy) == 1 and blocks:
            return ranked(roomy[0], reason)
        if roomy:  # stable: the least loaded among the fewest placements
            first = min(roomy, key=lambda r: self._placed[r])
            self.place(first)
            return ranked(first, reason, placed=True)
        return ranked(min(by_load, key=lambda r: (load.get(r, 0), self._placed[r])),
                      "least-loaded")

    def place(self, replica: str) -> None:
        """Count a placement on ``replica`` (the oldest of a full window no longer counts).
        :meth:`decide` calls it; a router calls it where Serve took another replica than
        the decided one (after :meth:`withdraw`)."""
        if len(self._placements) == self.window:
            self._placed[self._placements[0]] -= 1
        self._placements.append(replica)
        self._placed[replica] += 1

    def withdraw(self, replica: str) -> None:
        """Uncount the latest placement on ``replica``: its request was decided again, or
        went elsewhere (a no-op where the window holds none)."""
        for k in range(len(self._placements) - 1, -1, -1):
            if self._placements[k] == replica:
                del self._placements[k]
                self._placed[replica] -= 1
                return

    def routed(self, session: str | None, replica: str) -> None:
        """Remember that ``session``'s request went to ``replica`` (its home from now on)."""
        if session is None:
            return
        self._sessions[session] = replica
        self._sessions.move_to_end(session)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    def placements(self) -> dict[str, int]:
        """How many of the last ``window`` placements each replica received (none: left
        out)."""
        return {r: n for r, n in self._placed.items() if n > 0}

    def forget_replica(self, replica: str) -> None:
        """Drop the sessions whose home was ``replica`` and its placements (it stopped or
        died)."""
        for session in [s for s, r in self._sessions.items() if r == replica]:
            del self._sessions[session]
        if self._placed.pop(replica, 0):
            kept = [r for r in self._placements if r != replica]
            self._placements.clear()
            self._placements.extend(kept)

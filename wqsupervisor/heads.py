"""Several head nodes of one cluster: when does the tunnel move to the next, and to which.

A cluster often has several login nodes (``--via login1 --via login2``). The
tunnel stays on the one it is on while it can: a session that ended is
restarted there, as with one head. It moves when that head cannot give it a
forward: at once when the head cannot be reached (no route, refused, timed
out, unknown name: the head is down or being rebooted), after
:data:`MISSES_BEFORE_MOVING` attempts in a row that never came up for any
other reason (the port held there, a session that dies at once), and after a
failure that will not change by waiting (authentication, host key), as long
as some other head has not failed that way too. The heads are tried in the
order given, wrapping around: each other head at once, then (every head out
of reach, as when the trouble is on the campus side) one move per restart,
paced by the restart backoff.

The choice is pure (:meth:`Heads.after_attempt`) and tested as a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .session import FailureKind, SessionFailure

MISSES_BEFORE_MOVING = 2
# The head itself cannot be reached: waiting there only loses time.
UNREACHABLE = frozenset({FailureKind.NETWORK, FailureKind.REFUSED, FailureKind.RESOLVE})


@dataclass(frozen=True)
class Move:
    """Go to head ``to`` (an index), because ``why``; ``at_once`` unless it is only another round."""

    to: int
    why: str
    at_once: bool = True


@dataclass(frozen=True)
class Heads:
    """Which of ``count`` heads the tunnel is on, and what it has learnt of each."""

    count: int
    current: int = 0
    misses: int = 0
    refused_for_good: frozenset[int] = field(default_factory=frozenset)
    moves: int = 0
    """Moves since the tunnel was last up: once every head was tried, the next move waits its turn."""

    def after_attempt(self, came_up: bool, failure: SessionFailure | None) -> tuple[Heads, Move | None]:
        """The state after one attempt on the current head, and the move to make (None: stay)."""
        if came_up:
            return replace(self, misses=0, moves=0), None
        if self.count < 2:
            return self, None
        misses = self.misses + 1
        refused = self.refused_for_good
        if failure is not None and failure.permanent:
            refused = refused | {self.current}
        state = replace(self, misses=misses, refused_for_good=refused)
        if failure is not None and failure.permanent:
            why = f"{failure.message} (it will not change by waiting)"
        elif failure is not None and failure.kind in UNREACHABLE:
            why = failure.message
        elif misses >= MISSES_BEFORE_MOVING:
            why = f"{misses} attempts in a row did not come up" + (f": {failure.message}" if failure else "")
        else:
            return state, None
        to = state.next_head()
        if to is None:
            return state, None
        # The first visit to each other head is at once; after a whole round (the trouble is
        # likely on our side of the network, where every head is out of reach) the restart
        # backoff paces the moves, so an outage is not a tight loop between heads.
        at_once = self.moves < self.count - 1
        return replace(state, current=to, misses=0, moves=self.moves + 1), Move(to, why, at_once)

    def next_head(self) -> int | None:
        """The next head in order that has not refused for good, or None when none is left."""
        for step in range(1, self.count):
            index = (self.current + step) % self.count
            if index not in self.refused_for_good:
                return index
        return None

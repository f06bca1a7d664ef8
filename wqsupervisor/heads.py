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
order given, wrapping around: each other head at once, then one move per
restart, paced by the restart backoff. When no head can be reached over the
network at all (timeouts, no route: the campus side is cut off, most likely),
the tunnel goes back to the head it was last up on and waits there, where the
compute nodes' hops still are.

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
    last_up: int = 0
    """The head the tunnel was last up on: where the compute nodes' hops are."""
    out_of_reach: frozenset[int] = field(default_factory=frozenset)
    """Heads whose network could not be crossed (timeout, no route) since the tunnel was last up."""

    def after_attempt(self, came_up: bool, failure: SessionFailure | None) -> tuple[Heads, Move | None]:
        """The state after one attempt on the current head, and the move to make (None: stay)."""
        if came_up:
            return replace(self, misses=0, moves=0, last_up=self.current, out_of_reach=frozenset()), None
        if self.count < 2:
            return self, None
        misses = self.misses + 1
        refused = self.refused_for_good
        if failure is not None and failure.permanent:
            refused = refused | {self.current}
        state = replace(self, misses=misses, refused_for_good=refused)
        if failure is not None and failure.kind is FailureKind.NETWORK:
            return state._network_failed(failure)
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
        return state._go(to, why)

    def _go(self, to: int, why: str, at_once: bool | None = None) -> tuple[Heads, Move]:
        # The first visit to each other head is at once; after a whole round the restart
        # backoff paces the moves, so trouble that follows the tunnel everywhere is not a
        # tight loop between heads.
        if at_once is None:
            at_once = self.moves < self.count - 1
        return replace(self, current=to, misses=0, moves=self.moves + 1), Move(to, why, at_once)

    def _network_failed(self, failure: SessionFailure) -> tuple[Heads, Move | None]:
        """No route, or no answer in time: this head, or our own side of the network?

        Another head that has not failed so yet is tried at once. When every head
        has (the campus side is cut off, most likely), the tunnel goes back to the
        head it was last up on and waits there: the compute nodes' hops are still
        on that head, and a tunnel that came back on another would leave them
        knocking at a port nobody forwards.
        """
        state = replace(self, out_of_reach=self.out_of_reach | {self.current})
        other = state.next_head(skipping=state.out_of_reach)
        if other is not None:
            return state._go(other, failure.message, at_once=True)
        home = self.last_up
        if home == self.current or home in state.refused_for_good:
            return state, None
        why = f"{failure.message}; every head is out of reach: back to the head it was last up on"
        return state._go(home, why, at_once=False)

    def next_head(self, skipping: frozenset[int] = frozenset()) -> int | None:
        """The next head in order that has not refused for good (nor is in ``skipping``), or None."""
        for step in range(1, self.count):
            index = (self.current + step) % self.count
            if index not in self.refused_for_good and index not in skipping:
                return index
        return None

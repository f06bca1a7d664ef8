"""A tunnel's life: its states and the only transitions between them.

The table lives here, apart from the tunnel that moves through it, so that
the drop-in handle, status and metrics can name states without loading the
tunnel, its transports or asyncio machinery::

    NEW -> CONNECTING -> UP <-> STALLED
               |          |        |
               v          v        v
             DOWN <-------+--------+ -> CONNECTING ...
               |
               v
            FAILED        (any) -> CLOSED
"""

from __future__ import annotations

import enum

from .errors import IllegalTransition


class TunnelState(enum.Enum):
    """Where a tunnel is in its life."""

    NEW = "new"
    CONNECTING = "connecting"
    UP = "up"
    STALLED = "stalled"
    DOWN = "down"
    FAILED = "failed"
    CLOSED = "closed"

    def can_become(self, new: TunnelState) -> bool:
        """True when ``new`` may follow this state."""
        return new in _ALLOWED[self]

    def to(self, new: TunnelState) -> TunnelState:
        """``new``, or :class:`IllegalTransition` when it may not follow this state."""
        if not self.can_become(new):
            raise IllegalTransition("tunnel", self.value, new.value)
        return new


_ALLOWED: dict[TunnelState, frozenset[TunnelState]] = {
    TunnelState.NEW: frozenset({TunnelState.CONNECTING, TunnelState.FAILED, TunnelState.CLOSED}),
    TunnelState.CONNECTING: frozenset(
        {TunnelState.UP, TunnelState.DOWN, TunnelState.FAILED, TunnelState.CLOSED}
    ),
    TunnelState.UP: frozenset({TunnelState.STALLED, TunnelState.DOWN, TunnelState.CLOSED}),
    TunnelState.STALLED: frozenset({TunnelState.UP, TunnelState.DOWN, TunnelState.CLOSED}),
    TunnelState.DOWN: frozenset({TunnelState.CONNECTING, TunnelState.FAILED, TunnelState.CLOSED}),
    TunnelState.FAILED: frozenset({TunnelState.CLOSED}),
    TunnelState.CLOSED: frozenset(),
}

"""Is an up session alive? Keepalives, stalls, and when to replace a silent session.

A pure value: :meth:`Liveness.observe` takes what the watch saw since the
last look (a pong, a head probe's result, a forward check's result) and the
time, and returns the next :class:`Liveness` with a :class:`Decision` (what
to send or probe now, what changed, whether the session must go). No clock,
no sockets: the tunnel's watch loop gathers the observations and applies the
decisions, and ``tests/test_liveness.py`` checks the rules as exact tables.

The rules:

* a ping every ``keepalive_interval``, one at a time; a session whose last
  pong is older than ``stall_after`` is STALLED, and UP again on the next pong;
* while stalled, the head's sshd is probed with fresh connections. While
  they fail, the session is kept: nothing better could be opened. Once one
  succeeds, the session gets ``grace`` seconds to answer; if the head still
  answers fresh connections after that, the session is replaced;
* with no route at all (:attr:`Reach.NO_ROUTE`) the retransmission cap is
  lifted and the grace becomes :data:`GRACE_UNCAPPED`; it comes back with
  the route, or when the session resumes;
* where the session's socket is ours, what ``TCP_INFO`` says of it
  (:class:`Acks`) tells a connection that survived an outage from one a NAT
  or firewall forgot: once our retransmissions (capped at 1 s) are
  acknowledged again, the connection is alive end to end, and only the head's
  own backoff (not ours to cap) holds its answer back. Such a session is kept
  past the grace until that backoff must have retried (:func:`head_retry_by`);
  one whose retransmissions stay unacknowledged is replaced as before. While
  stalled with nothing unacknowledged, a ping is sent anyway (``nudge``) so
  there is data whose acknowledgement can tell;
* a session that resumes (``resumable``: the head relay keeps every worker
  connection, so replacing it costs nothing) is never kept waiting for the
  head's backoff, nor given the long grace of an outage: once the head
  answers fresh connections for ``grace`` seconds, a silent one is replaced;
* while up, the forward is checked every ``probe_interval``: a different
  master, or two losses or refusals in a row, end the session.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

# How long a silent session may take to answer once the head is reachable again:
# about one capped retransmission when we own the socket, TCP's own backoff when not.
GRACE_CAPPED = 2.0
GRACE_UNCAPPED = 12.0
# TCP's largest retransmission interval (TCP_RTO_MAX): the head's sshd socket is not ours.
HEAD_RTO_MAX = 120.0
# Slack on the head's retransmission: its initial RTO (200 ms and the RTT), the answer's way back, a tick.
HEAD_RETRY_SLACK = 2.0
# Forward checks in a row that found the forward lost or refused before it counts as gone.
LOST_STREAK = 2


class ForwardCheck(enum.Enum):
    """What one probe through the head node's remote port found."""

    REACHED = "reached"  # this master answered through the remote port
    HELD = "held"  # the connection stayed open without an answer: the master is busy
    LOST = "lost"  # the master answers here but not through the head node
    REFUSED = "refused"  # the remote port closed the connection at once
    WRONG = "wrong"  # a different master answered


class Reach(enum.Enum):
    """What a fresh connection to the head's sshd found."""

    UP = "up"
    DOWN = "down"  # no answer, or refused
    NO_ROUTE = "no route"  # this machine has no route there (link down, network gone)


@dataclass(frozen=True)
class Timing:
    """The intervals liveness works with (from the settings)."""

    keepalive_interval: float
    stall_after: float
    probe_interval: float


@dataclass(frozen=True)
class Acks:
    """What the session's own socket says of its data (``TCP_INFO``), on the watch's clock."""

    unacked: int
    """Segments sent and not acknowledged yet."""
    retransmitting: bool
    """Unacknowledged data timed out and is being retransmitted (``tcpi_retransmits`` > 0)."""
    last_ack: float
    """When the socket last received an acknowledgement."""


def head_retry_by(silent_since: float, acked_at: float) -> float:
    """When the head must have retransmitted, for a session silent since ``silent_since`` whose path
    was back by ``acked_at``.

    The head's data has waited since about ``silent_since``; its retransmission
    interval doubles from there, so the first retry after the path's return
    comes at most as long after it as the loss had lasted (and at most
    :data:`HEAD_RTO_MAX`).
    """
    return acked_at + min(acked_at - silent_since, HEAD_RTO_MAX) + HEAD_RETRY_SLACK


@dataclass(frozen=True)
class Observation:
    """What came back since the last look; all empty is a plain tick of the clock."""

    pinged: bool = False
    """The ping in flight has finished (answered or not)."""
    rtt: float | None = None
    """It was answered, after this many seconds."""
    head: Reach | None = None
    """The head probe in flight has finished with this."""
    forward: ForwardCheck | None = None
    """The forward check in flight has finished with this."""
    acks: Acks | None = None
    """The session socket's ``TCP_INFO`` now (read while stalled; None where the socket is not ours)."""


@dataclass(frozen=True)
class Decision:
    """What the watch must do now."""

    ping: bool = False
    """Send a ping."""
    probe_head: bool = False
    """Open a fresh connection to the head's sshd (timeout 1 s) and report its :class:`Reach`."""
    probe_forward: bool = False
    """Check the forward (:class:`ForwardCheck`)."""
    nudge: bool = False
    """Send one more ping although one is in flight (its answer is not awaited): data on the socket
    whose acknowledgement shows whether the connection still reaches the head."""
    cap: bool | None = None
    """Cap (True) or uncap (False) the socket's retransmissions, then report with :meth:`Liveness.capped`."""
    stalled: float | None = None
    """The session just stalled, silent this many seconds."""
    resumed: float | None = None
    """The session answered again after this many seconds stalled (drop any head probe in flight)."""
    end: str | None = None
    """End the session, for this reason."""
    replace: bool = False
    """With ``end``: the session was silent, not gone; its sshd may still hold the port."""


@dataclass(frozen=True)
class Stall:
    """A silent session being given its chance."""

    began: float
    silent_since: float
    grace: float
    reachable_at: float | None = None
    probing: bool = False
    lost_at: float | None = None
    """When our socket was first seen retransmitting during this stall."""
    acked_at: float | None = None
    """When an acknowledgement was first seen after that: the connection survived."""
    nudged: float | None = None

    def kept(self, now: float) -> bool:
        """True while an acknowledged (surviving) session waits for the head's own retransmission."""
        return self.acked_at is not None and now < head_retry_by(self.silent_since, self.acked_at)


@dataclass(frozen=True)
class Liveness:
    """What the watch knows about one up session."""

    timing: Timing
    grace: float
    last_pong: float
    next_probe: float
    ping_sent: float | None = None
    pinging: bool = False
    checking: bool = False
    lost_streak: int = 0
    stall: Stall | None = None
    rto_lifted: bool = False
    resumable: bool = False
    """Replacing the session costs no worker connection (the head relay resumes them)."""

    @classmethod
    def start(
        cls, timing: Timing, now: float, *, grace: float, rto_lifted: bool = False, resumable: bool = False
    ) -> Liveness:
        """A session that just came up at ``now``; ``grace`` is the resume grace of a new stall."""
        return cls(
            timing=timing,
            grace=grace,
            last_pong=now,
            next_probe=now + timing.probe_interval,
            rto_lifted=rto_lifted,
            resumable=resumable,
        )

    @property
    def stalled(self) -> bool:
        """True while the session is silent."""
        return self.stall is not None

    def capped(self, on: bool) -> Liveness:
        """The retransmission cap was set (``on``) or lifted, as a decision asked."""
        return replace(self, rto_lifted=not on)

    def observe(self, seen: Observation, now: float) -> tuple[Liveness, Decision]:
        """The next state, and what to do now."""
        t = self.timing
        live = self
        ping = False
        if seen.pinged:
            live = replace(live, pinging=False, last_pong=now if seen.rtt is not None else live.last_pong)
        if not live.pinging and (live.ping_sent is None or now - live.ping_sent >= t.keepalive_interval):
            live = replace(live, pinging=True, ping_sent=now)
            ping = True
        silent = now - live.last_pong
        if live.stall is None and silent > t.stall_after:
            stall = Stall(began=now, silent_since=live.last_pong, grace=live.grace)
            live = replace(live, stall=stall, lost_streak=0)
            live, nudge = live._step_acks(seen.acks, now)
            live, decision = live._forward(seen, now)
            return live, replace(decision, ping=ping, stalled=silent, nudge=nudge)
        if live.stall is not None and silent <= t.stall_after:
            began = live.stall.began
            live = replace(live, stall=None, next_probe=now + t.probe_interval)
            live, decision = live._forward(seen, now)
            cap = True if self.rto_lifted else None
            return live, replace(decision, ping=ping, resumed=now - began, cap=cap)
        if live.stall is not None:
            live, nudge = live._step_acks(seen.acks, now)
            live, decision = live._step_stall(seen.head, now)
            if decision.end is not None:
                return live, replace(decision, ping=ping)
            live, forward = live._forward(seen, now)
            return live, replace(
                forward, ping=ping, probe_head=decision.probe_head, cap=decision.cap, nudge=nudge
            )
        live, decision = live._forward(seen, now)
        return live, replace(decision, ping=ping)

    def _step_acks(self, acks: Acks | None, now: float) -> tuple[Liveness, bool]:
        """Note what the socket's acknowledgements say; True to nudge it with a ping."""
        stall = self.stall
        assert stall is not None
        if acks is None or stall.acked_at is not None:
            return self, False
        if stall.lost_at is None and acks.retransmitting:
            stall = replace(stall, lost_at=now)
        elif stall.lost_at is not None and acks.last_ack > stall.lost_at:
            return replace(self, stall=replace(stall, acked_at=now)), False
        nudge = acks.unacked == 0 and (
            stall.nudged is None or now - stall.nudged >= self.timing.keepalive_interval
        )
        if nudge:
            stall = replace(stall, nudged=now)
        return replace(self, stall=stall), nudge

    def _step_stall(self, head: Reach | None, now: float) -> tuple[Liveness, Decision]:
        """Keep or replace a silent session, from the head probe's result."""
        stall = self.stall
        assert stall is not None
        cap: bool | None = None
        if head is not None and stall.probing:
            stall = replace(stall, probing=False)
            ok = head is Reach.UP
            if head is Reach.NO_ROUTE and not self.rto_lifted:
                # Keep the session alive through the outage; it will resume on TCP's own schedule.
                cap = False
                if not self.resumable:
                    stall = replace(stall, grace=max(stall.grace, GRACE_UNCAPPED))
            elif ok and self.rto_lifted:
                cap = True
            if ok and stall.reachable_at is None:
                stall = replace(stall, reachable_at=now)
            elif ok and stall.reachable_at is not None and self._due(stall, now):
                reason = (
                    f"session silent for {now - stall.silent_since:.1f} s although the head node has "
                    f"answered fresh connections for {now - stall.reachable_at:.1f} s; replacing it"
                )
                return replace(self, stall=stall), Decision(cap=cap, end=reason, replace=True)
            elif not ok:
                stall = replace(stall, reachable_at=None)
        probe = not stall.probing and (stall.reachable_at is None or self._due(stall, now))
        if probe:
            stall = replace(stall, probing=True)
        return replace(self, stall=stall), Decision(probe_head=probe, cap=cap)

    def _due(self, stall: Stall, now: float) -> bool:
        """The reachable head's grace is over and no acknowledgement keeps the session."""
        assert stall.reachable_at is not None
        return now - stall.reachable_at >= stall.grace and (self.resumable or not stall.kept(now))

    def _forward(self, seen: Observation, now: float) -> tuple[Liveness, Decision]:
        """Take a forward check's result, and start the next one when it is due (only while up)."""
        live = self
        if seen.forward is not None and live.checking:
            live = replace(live, checking=False)
            if live.stall is None:
                lost = seen.forward in (ForwardCheck.LOST, ForwardCheck.REFUSED)
                live = replace(live, lost_streak=live.lost_streak + 1 if lost else 0)
                if seen.forward is ForwardCheck.WRONG or live.lost_streak >= LOST_STREAK:
                    reason = f"the remote port stopped reaching the master ({seen.forward.value})"
                    return live, Decision(end=reason)
        if not live.checking and live.stall is None and now >= live.next_probe:
            return replace(live, checking=True, next_probe=now + live.timing.probe_interval), Decision(
                probe_forward=True
            )
        return live, Decision()

"""Watching an up session: the thin adapter between a live session and :mod:`wqsupervisor.liveness`.

It runs the pings, head probes and forward checks that
:meth:`Liveness.observe <wqsupervisor.liveness.Liveness.observe>` asks for,
gathers their results into observations (with the session socket's
``TCP_INFO`` while it is stalled, where the socket is ours), and reports what
liveness decides to a :class:`Reporter` (the tunnel). It decides nothing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

from .clock import Clock
from .liveness import Acks, ForwardCheck, Liveness, Observation, Reach
from .session import Session
from .tcpconn import tcp_info


@dataclass(frozen=True)
class Reporter:
    """Where the watch reports to (the tunnel), and the one effect the tunnel owns: the socket's cap."""

    rtt: Callable[[float], None]
    """A ping came back after this many seconds."""
    stalled: Callable[[float], None]
    """The session went silent, for this many seconds."""
    resumed: Callable[[float], None]
    """The session answers again, after this many seconds stalled."""
    cap: Callable[[bool], bool]
    """Cap (True) or lift the cap on the socket's retransmissions; returns True when it was done."""


async def watch(
    session: Session,
    live: Liveness,
    *,
    clock: Clock,
    closing: asyncio.Event,
    probe_head: Callable[[], Coroutine[Any, Any, Reach]],
    check_forward: Callable[[], Coroutine[Any, Any, ForwardCheck]],
    report: Reporter,
) -> tuple[str, int | None, bool]:
    """Watch ``session`` until it ends or must be replaced: (reason, exit code, replaced)."""
    exited = asyncio.create_task(session.exited())
    closed = asyncio.create_task(closing.wait())
    ping: asyncio.Task[float] | None = None
    head: asyncio.Task[Reach] | None = None
    check: asyncio.Task[ForwardCheck] | None = None
    nudges: set[asyncio.Task[float]] = set()
    tick = min(live.timing.keepalive_interval, 0.25)
    try:
        while True:
            done, _ = await asyncio.wait([exited, closed], timeout=tick, return_when=asyncio.FIRST_COMPLETED)
            if closed in done:
                return "closed", None, False
            if exited in done:
                return session.failure().message, exited.result(), False
            seen = Observation()
            if ping is not None and ping.done():
                rtt = ping.result() if ping.exception() is None else None
                seen = Observation(pinged=True, rtt=rtt)
                if rtt is not None:
                    report.rtt(rtt)
                ping = None
            if head is not None and head.done():
                seen = replace(seen, head=head.result() if head.exception() is None else Reach.DOWN)
                head = None
            if check is not None and check.done():
                found = check.result() if check.exception() is None else ForwardCheck.REFUSED
                seen = replace(seen, forward=found)
                check = None
            now = clock.monotonic()
            if live.stalled and session.sock is not None:
                seen = replace(seen, acks=_acks(session, now))
            live, d = live.observe(seen, now)
            if d.ping:
                ping = asyncio.create_task(session.ping())
            if d.nudge:
                # Its answer follows the ping in flight, which reports the resumption.
                nudge = asyncio.create_task(session.ping())
                nudges.add(nudge)
                nudge.add_done_callback(_forget(nudges))
            if d.stalled is not None:
                report.stalled(d.stalled)
            if d.resumed is not None:
                report.resumed(d.resumed)
                if head is not None:
                    head.cancel()
                    head = None
            if d.cap is not None and report.cap(d.cap):
                live = live.capped(d.cap)
            if d.end is not None:
                return d.end, None, d.replace
            if d.probe_head:
                head = asyncio.create_task(probe_head())
            if d.probe_forward:
                check = asyncio.create_task(check_forward())
    finally:
        closed.cancel()
        for task in (ping, head, check, *nudges):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


def _acks(session: Session, now: float) -> Acks | None:
    """What the session's own socket says of its data, on the watch's clock."""
    assert session.sock is not None
    tcp = tcp_info(session.sock)
    if tcp is None:
        return None
    return Acks(
        unacked=tcp.unacked, retransmitting=tcp.retransmits > 0, last_ack=now - tcp.last_ack_recv_ms / 1000
    )


def _forget(tasks: set[asyncio.Task[float]]) -> Callable[[asyncio.Task[float]], None]:
    """A done callback that drops a finished task from ``tasks`` and retrieves its outcome."""

    def done(task: asyncio.Task[float]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()

    return done

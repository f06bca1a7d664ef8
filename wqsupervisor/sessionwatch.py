"""Watching an up session: the thin adapter between a live session and :mod:`wqsupervisor.liveness`.

It runs the pings, head probes and forward checks that
:meth:`Liveness.observe <wqsupervisor.liveness.Liveness.observe>` asks for,
gathers their results into observations, and reports what liveness decides
to a :class:`Reporter` (the tunnel). It decides nothing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

from .clock import Clock
from .liveness import ForwardCheck, Liveness, Observation, Reach
from .session import Session


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
            live, d = live.observe(seen, clock.monotonic())
            if d.ping:
                ping = asyncio.create_task(session.ping())
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
        for task in (ping, head, check):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

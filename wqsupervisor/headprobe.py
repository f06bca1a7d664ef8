"""Does the head node answer a fresh connection? The probe behind stall decisions and early wake-ups.

A fresh TCP connection to the head's sshd that gets an SSH banner proves the
path to the head works now, whatever an old session's connection is going
through. Behind a ProxyJump or ProxyCommand only the transport knows the way,
so there a fresh connection of its own that runs ``true`` on the head answers
the question instead (a one-off ``ssh head true``, or paramiko's own).

OpenSSH 9.8 and later penalise a source address for every connection that
leaves before authenticating (``PerSourcePenalties``, ``noauth``: 1 s each by
default, and once 15 s have accumulated sshd drops every new connection from
that address, ours and everyone's behind it). A probe that sshd answered costs
one such second, so probes that get an answer are spaced wider than that.
"""

from __future__ import annotations

import asyncio
import errno
import socket

from .clock import Clock
from .liveness import Reach
from .session import SessionFactory

_NO_ROUTE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN}
# Between probes while the head does not answer (no sshd session, no penalty).
RETRY_DOWN = 0.5
# Between probes while it answers: twice the default penalty a probe adds, so it never accumulates.
RETRY_UP = 2.0


async def probe_head(sessions: SessionFactory, timeout: float) -> Reach:
    """Open a fresh connection to the head's sshd: does it greet us, and if not, is there a route?"""
    head = sessions.head
    if head is None:
        done = await sessions.run_on_head("true", b"", timeout, fresh=True)
        return Reach.UP if done.status == 0 else Reach.DOWN
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(head.host, head.port, family=socket.AF_UNSPEC)
            try:
                banner = await reader.readline()
            finally:
                writer.close()
        return Reach.UP if banner.startswith(b"SSH-") else Reach.DOWN
    except TimeoutError:
        return Reach.DOWN
    except OSError as exc:
        return Reach.NO_ROUTE if exc.errno in _NO_ROUTE else Reach.DOWN


async def head_returns(sessions: SessionFactory, clock: Clock) -> None:
    """Complete once the head's sshd, unreachable at first, greets a fresh connection again.

    Only a change from unreachable to reachable counts: a head that was
    reachable all along gives no reason to skip the backoff.
    """
    was_down = False
    while True:
        up = await probe_head(sessions, timeout=1.0) is Reach.UP
        if up and was_down:
            return
        was_down = was_down or not up
        await clock.sleep(RETRY_UP if up else RETRY_DOWN)

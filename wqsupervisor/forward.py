"""Proving the forward: a probe through the head node's remote port must reach *this* master.

:class:`ForwardCheck` names what one probe found; :class:`ForwardProver`
sends probes through a session (:class:`~wqsupervisor.session.Session`) and to
the master directly, and tells them apart. It loads no transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import AuthenticationFailed, ProtocolError, TunnelError
from .liveness import ForwardCheck
from .master import MasterIdentity, MasterInfo
from .session import Session, SessionEnded
from .wqproto import NO_CREDENTIALS, Credentials, request_status

DirectProbe = Callable[[float], Awaitable[list[dict[str, Any]] | None]]
"""Asks the master for its status on its own port (``timeout`` seconds); None when it does not answer."""


class ForwardProver:
    """Checks that the head's remote port leads to one master (learning its identity on the way)."""

    def __init__(
        self, master: MasterInfo, direct_probe: DirectProbe, credentials: Credentials = NO_CREDENTIALS
    ) -> None:
        self.master = master
        self.credentials = credentials
        self._direct_probe = direct_probe
        self._identity: MasterIdentity | None = None

    def expected(self) -> MasterIdentity:
        """The master the forward must reach: as it last answered here, else as it was described."""
        return self._identity or MasterIdentity(port=self.master.port, project=self.master.name)

    async def verify(self, session: Session, where: str) -> str:
        """Probe until the remote port reaches this master; returns how it was proven.

        A master outside ``wait()`` never answers, so the probe waits only a few
        round trips of this very session (measured first) before it settles
        for a connection held open: a refusal would have come back by then.
        ``where`` names the remote port for an error (``port N on HOST``).
        """
        rtt = await session.ping()
        patience = min(0.5, max(0.15, 4 * rtt + 0.1))
        pause = 0.02
        while True:
            check = await self.check(session, timeout=patience)
            if check is ForwardCheck.REACHED:
                return "status"
            if check is ForwardCheck.HELD:
                return "connect"
            if check is ForwardCheck.WRONG:
                raise TunnelError(
                    f"remote port {where} leads to another master, not the {self.expected()}",
                    "pick another --remote-port",
                )
            if not session.running:
                raise SessionEnded(await session.exited())
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)

    async def check(self, session: Session, timeout: float = 2.0) -> ForwardCheck:
        """Ask for the master's status through the head's remote port, and on the master's own port.

        No answer through the head while the master answers here means the
        forward is lost; no answer from either means the application is
        outside ``wait()``, and a connection held open proves the path as far
        as the master's listening socket.
        """
        through = asyncio.create_task(
            request_status(session.open_probe, credentials=self.credentials, timeout=timeout)
        )
        direct = asyncio.create_task(self._direct(timeout))
        try:
            reply = await through
        except TimeoutError:
            here = await direct
            return ForwardCheck.LOST if here else ForwardCheck.HELD
        except AuthenticationFailed as exc:
            direct.cancel()
            raise TunnelError(exc.message, exc.hint) from exc
        except (ProtocolError, OSError):
            direct.cancel()
            return ForwardCheck.REFUSED
        here = await direct
        if here:
            self._identity = MasterIdentity.from_status(here[0])
        seen = MasterIdentity.from_status(reply[0]) if reply else None
        if seen is None or not self.expected().matches(seen):
            return ForwardCheck.WRONG
        return ForwardCheck.REACHED

    async def owner(self, session: Session, timeout: float = 2.0) -> MasterIdentity | None:
        """Which master answers through ``session``'s probes, if any."""
        try:
            reply = await request_status(session.open_probe, credentials=self.credentials, timeout=timeout)
        except (SessionEnded, TimeoutError, OSError, ProtocolError, AuthenticationFailed):
            return None
        return MasterIdentity.from_status(reply[0]) if reply else None

    async def _direct(self, timeout: float) -> list[dict[str, Any]] | None:
        """The master's status asked on its own port; None when it does not answer."""
        try:
            return await self._direct_probe(timeout)
        except Exception:
            return None

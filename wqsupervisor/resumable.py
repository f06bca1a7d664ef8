"""The resumable OpenSSH transport: the tunnel's ssh carries the relay's frames instead of a ``-R``.

Each session is one ``ssh -T -L PROBE.sock:127.0.0.1:REMOTE head CMD``
whose remote command greets (``wqs-session $PPID``, the head's sshd session,
as every session does) and then runs the head relay
(:mod:`wqsupervisor.relay`) from the session's stdin. The relay, not sshd,
listens on the head's ``BIND:REMOTE``; it outlives the session, so a restart
of the tunnel reattaches to it and no worker connection notices. The
agent's end, a :class:`~wqsupervisor.relay.peer.RelayPeer`, belongs to the
factory and so outlives every session too.

Where the head node has no usable Python (3.6 or later), or for the
one-off sessions that allocate a port or ask who holds one, sessions are
plain :mod:`wqsupervisor.openssh` ones; :attr:`ResumableSessions.off` says
why resumption is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import socket
from collections.abc import Sequence
from typing import Any

from .errors import TunnelError
from .logs import get_logger
from .openssh import OpenSSHSession, OpenSSHSessions, remote_argv, spawn, tunnel_argv
from .protocol.snapshot import RelaySnapshot
from .relay import program
from .relay.peer import Carrier, RelayEnded, RelayPeer, RelayRefused, RelayStats
from .session import Owner, SessionEnded, SessionFailed, SessionFailure
from .target import SshTarget

__all__ = ["ResumableSession", "ResumableSessions"]

# ssh's own exit status when it could not connect or lost the connection.
_SSH_FAILED = 255


class ResumableSession(OpenSSHSession):
    """One ssh whose stdin/stdout are the relay's carrier (after the greeting line)."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        target: SshTarget,
        probe_path: str | None,
        sock: socket.socket | None,
        peer: RelayPeer,
        carrier: Carrier,
    ) -> None:
        self.peer = peer
        self.carrier = carrier
        self._generation = -1
        self._closing: asyncio.Future[int | None] | None = None
        self.resumed: bool | None = None
        self._attached: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._attached.add_done_callback(lambda f: f.cancelled() or f.exception())
        super().__init__(proc, target, probe_path, sock)

    @classmethod
    async def launch(
        cls,
        argv: Sequence[str],
        target: SshTarget,
        probe_path: str | None,
        sock: socket.socket | None,
        peer: RelayPeer,
    ) -> ResumableSession:
        """Start ssh on pipes of our own (the carrier) and send it the head relay's program."""
        to_ssh, ssh_in = os.pipe()
        ssh_out, from_ssh = os.pipe()
        try:
            proc = await spawn(argv, probe_path, stdio=(to_ssh, from_ssh))
        except BaseException:
            for fd in (ssh_in, ssh_out):
                os.close(fd)
            raise
        finally:
            os.close(to_ssh)
            os.close(from_ssh)
        carrier = await Carrier.open(peer, ssh_out, ssh_in)
        carrier.write(program.source())
        return cls(proc, target, probe_path, sock, peer, carrier)

    async def _read_stdout(self) -> None:
        try:
            line = await self.carrier.greeting
        except RelayEnded as exc:
            self._attached.set_exception(exc)
            return
        self._lines.feed(line)
        if self._lines.remote_pid is None:
            self._attached.set_exception(RelayEnded("no greeting"))
            self.carrier.close()
            return
        try:
            mode = await self.peer.attach(self.carrier)
        except RelayEnded as exc:
            if not self._attached.done():
                self._attached.set_exception(exc)
            return
        self._generation = self.peer.generation
        self.resumed = mode == "resumed"
        self._attached.set_result(mode)
        await self.peer.carrier_lost()

    async def established(self) -> None:
        """Wait for the greeting and the relay's answer; raises :class:`SessionEnded` if ssh exits first."""
        await super().established()
        ended = asyncio.ensure_future(self.exited())
        attached = asyncio.ensure_future(asyncio.shield(self._attached))
        try:
            waits: list[asyncio.Future[Any]] = [attached, ended]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            attached.cancel()
        if not self._attached.done() or self._attached.exception() is not None:
            raise SessionEnded(await self.exited())

    def failure(self) -> SessionFailure:
        """A relay that serves another live supervisor refused this session: say whose; else as ssh says."""
        refused = self._attached.exception() if self._attached.done() else None
        if isinstance(refused, RelayRefused):
            owner = Owner.parse(refused.owner)
            if owner is not None and owner.gone():
                # Its session still hangs on the head: a restart after the backoff, not a failure for good.
                return SessionFailure.owner_gone(f"the relay on {self.target.destination}", owner)
            return SessionFailure.port_owned(
                f"the remote port on {self.target.destination}",
                "relay",
                owner.describe() if owner is not None else refused.owner,
            )
        return super().failure()

    async def ping(self) -> float:
        """One round trip to the head relay through this session."""
        if not self.running or not self._current:
            raise SessionEnded(self.proc.returncode)
        try:
            return await self.peer.ping()
        except RelayEnded:
            raise SessionEnded(self.proc.returncode) from None

    @property
    def _current(self) -> bool:
        return self._generation == self.peer.generation and self._attached.done()

    async def detach(self) -> int | None:
        """End this session but leave the head relay waiting for the next one (a restart)."""
        if self._current:
            self.peer.detach()
        try:
            return await super().close()
        finally:
            self.carrier.close()

    async def close(self, grace: float = 2.0) -> int | None:
        """End the session and the head relay with it (every worker connection closes).

        The tunnel's close() and its run loop may both close the session: the
        second waits for the first instead of asking a relay that is gone.
        """
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close(grace))
        return await asyncio.shield(self._closing)

    async def _close(self, grace: float) -> int | None:
        if self.running and self._current:
            if await self.peer.shutdown():
                # The relay said goodbye and exits: ssh follows with its status 0, unless it
                # is signalled first (the exit code would depend on who won).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.exited(), grace)
        else:
            await self.peer.close()
        try:
            return await super().close(grace)
        finally:
            self.carrier.close()


class ResumableSessions(OpenSSHSessions):
    """Starts sessions that run the head relay; falls back to plain ones where the head has no Python."""

    name = "resumable"

    def __init__(
        self,
        target: SshTarget,
        *,
        own_socket: bool = True,
        python: str = "python3",
        linger: float = 900.0,
        off: str | None = None,
    ) -> None:
        super().__init__(target, own_socket=own_socket)
        self.python = python
        self.linger = linger
        self.off: str | None = off
        """Why resumption is off (None: it is on, or not decided yet); ``off`` given: off from the start."""
        self._decided = off is not None
        self._relay_next = False
        self._peer: RelayPeer | None = None
        self._remote_port: int | None = None

    async def prepare(self, rundir: str, tag: str) -> None:
        """As :class:`OpenSSHSessions`, and ask the head node whether it has a usable Python."""
        await super().prepare(rundir, tag)
        await self._decide()

    async def _decide(self) -> None:
        if self._decided:
            return
        check = (
            f"{shlex.quote(self.python)} -c 'import sys; print(\"wqs-python\", sys.version_info >= (3, 6))'"
        )
        proc = await asyncio.create_subprocess_exec(
            *remote_argv(self.target, check),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.target.connect_timeout + 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return
        if proc.returncode == _SSH_FAILED:
            return  # the head was not reached: decide at the next session
        self._decided = True
        said = out.decode(errors="replace")
        if "wqs-python True" in said:
            self.off = None
            return
        if "wqs-python False" in said:
            self.off = f"{self.python} on the head node is older than 3.6"
        else:
            last = (err.decode(errors="replace").strip().splitlines() or [f"status {proc.returncode}"])[-1]
            self.off = f"no usable {self.python} on the head node: {last}"
        get_logger().warning("tunnel.resumption_off", reason=self.off)

    @property
    def relay(self) -> RelayStats | None:
        """The relay's figures, None before its first session."""
        return self._peer.stats() if self._peer is not None else None

    def relay_snapshot(self) -> RelaySnapshot | None:
        """The relay's figures for status output, None before its first session."""
        stats = self.relay
        if stats is None:
            return None
        return RelaySnapshot(
            connections=stats.connections,
            buffered=stats.buffered,
            resumptions=stats.resumptions,
            last_resumption=stats.last_resumption,
            last_took=round(stats.last_took, 4) if stats.last_took is not None else None,
            head_pid=stats.head_pid,
        )

    @property
    def holds_relay(self) -> bool:
        """True when a relay of ours may be waiting on the head (started, not known to have ended)."""
        return self._peer is not None and not self._peer.ended and self._remote_port is not None

    async def let_go(self) -> None:
        """Close the master connections kept for the relay's workers (the tunnel is up on another
        head: they are lost to us); the relay itself waits for :meth:`end_relay` or its linger."""
        if self._peer is not None:
            await self._peer.close()

    async def end_relay(self, timeout: float = 5.0) -> bool:
        """End the head relay even when no session is up (a tunnel closed while down, or failed, or
        moved to another head); True when no relay of ours is left there."""
        peer = self._peer
        if peer is None or peer.ended or self._remote_port is None:
            return True
        try:
            async with asyncio.timeout(min(timeout, self.target.connect_timeout)):
                session = await self.start(
                    master_port=peer.master_port, remote_port=self._remote_port, probes=None
                )
                try:
                    await session.established()
                finally:
                    await session.close()
        except (TimeoutError, SessionEnded, SessionFailed, TunnelError, OSError) as exc:
            get_logger().warning("tunnel.relay_left", reason=str(exc) or type(exc).__name__)
        return peer.ended

    async def start(self, *, master_port: int | None, remote_port: int, probes: str | None) -> OpenSSHSession:
        """A relay session for the tunnel's forward; a plain one to allocate or inspect a port, or off."""
        await self._decide()
        self._relay_next = master_port is not None and remote_port != 0 and self._decided and self.off is None
        if self._relay_next and (self._peer is None or self._peer.master_port != master_port):
            assert master_port is not None
            self._peer = RelayPeer("localhost", master_port, keepalive=self.target.keepalive)
        if self._relay_next:
            self._remote_port = remote_port
        return await super().start(master_port=master_port, remote_port=remote_port, probes=probes)

    def _argv(self, *, master_port: int | None, remote_port: int, probe_path: str | None) -> list[str]:
        if not self._relay_next:
            return super()._argv(master_port=master_port, remote_port=remote_port, probe_path=probe_path)
        return tunnel_argv(
            self.target,
            master_port=None,
            remote_port=remote_port,
            probe_path=probe_path,
            extra=[*self._extra, *(self._handoff.ssh_options() if self._handoff else [])],
            command=program.remote_command(self.python, self.target.bind, remote_port, self.linger),
        )

    async def _spawn(
        self, argv: list[str], probe_path: str | None, sock: socket.socket | None
    ) -> OpenSSHSession:
        if not self._relay_next:
            return await super()._spawn(argv, probe_path, sock)
        assert self._peer is not None
        return await ResumableSession.launch(argv, self.target, probe_path, sock, self._peer)

"""The batch systems' commands on the head node over paramiko: no ssh process.

With ``backend="paramiko"`` the scheduler's commands (``sbatch``, ``squeue``,
``scancel``, writing the launcher...) run on exec channels of one paramiko
connection that :class:`ParamikoRunner` keeps for itself. It is made as the
tunnel's is (:mod:`wqsupervisor.paramiko_config`,
:class:`~wqsupervisor.paramiko_connect.Dialer`): the same ssh config,
ProxyJump or ProxyCommand, known_hosts check and identities.

Jobs that last (workers on the head node, the factory) run on exec channels
of that connection too (:class:`~wqsupervisor.batch.paramiko_channels.ChannelJob`):
the channel's end is the job's, as an ssh session's end is with OpenSSH.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import paramiko

from ..errors import WQSupervisorError
from ..logs import get_logger
from ..paramiko_config import HostConfig, read_head
from ..paramiko_connect import REFUSALS, Connection, Dialer, failure_of
from ..paramiko_threads import SessionThreads
from ..target import SshTarget
from .base import SSH_FAILED, Completed, Lasting, Runner, SubmitError, remote_command
from .paramiko_channels import ChannelJob, NotStarted, close_channel, exec_blocking, open_lasting, timed_out

_JOIN_TIMEOUT = 5.0
# Errors that mean the connection (or the attempt to make it) failed, not the command.
_LOST = (*REFUSALS, paramiko.SSHException, EOFError, OSError)


class ParamikoRunner(Runner):
    """Commands on the head node over one paramiko connection of the runner's own.

    It is never the tunnel's connection: a tunnel that stalls (its session
    waiting on keepalives, its TCP connection retransmitting) does not hold
    the submissions, and a runner that reconnects does not disturb the workers'
    forward. The connection is made on first use, on ``target`` or, when that
    cannot be reached, on the first of ``others`` that can (heads that share a
    scheduler); that head is kept.

    Like :class:`~wqsupervisor.batch.base.SshRunner`, a command that could
    not reach the head node ends with status 255
    (:data:`~wqsupervisor.batch.base.SSH_FAILED`), which the schedulers read as
    "unavailable". A connection found lost before a command started is made
    again once, and the command run on it; one lost while a command runs is
    not retried (``sbatch`` may have been done), the command ends with 255 and
    the next one reconnects. Paramiko blocks, so every connect and command runs
    in a thread of its own (:class:`~wqsupervisor.paramiko_threads.SessionThreads`);
    the event loop never waits on it.
    """

    def __init__(
        self,
        target: SshTarget,
        env: Mapping[str, str] | None = None,
        others: Sequence[SshTarget] = (),
    ) -> None:
        self.heads = [target, *others]
        self.env = dict(env or {})
        self.connects = 0
        """How many connections were made (more than one: it reconnected)."""
        self._at = 0
        self._configs: dict[int, HostConfig] = {}
        self._conn: Connection | None = None
        self._dialer: Dialer | None = None
        self._notes: list[str] = []
        self._threads: SessionThreads | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False
        self._serials = itertools.count(1)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected" if self._alive() else "idle"
        return f"<ParamikoRunner {self.target.destination} {state}>"

    @property
    def target(self) -> SshTarget:
        """The head node the commands go to now."""
        return self.heads[self._at]

    def command_line(self, argv: Sequence[str]) -> str:
        """What the head node's shell is given for ``argv``: quoted as SshRunner quotes it, with ``env``."""
        return remote_command(argv, self.env)

    async def run(self, argv: Sequence[str], *, input: str | None = None, timeout: float = 60.0) -> Completed:
        """Run ``argv`` on the head node, ``input`` on its standard input; give up after ``timeout`` s."""
        if self._closed:
            return Completed(SSH_FAILED, "", "the head node's command connection is closed")
        command = self.command_line(argv)
        stdin = input.encode() if input is not None else b""
        for attempt in range(2):
            conn = await self._connection()
            if isinstance(conn, Completed):
                return conn
            try:
                return await self._exec(conn, command, stdin, timeout, argv[0] if argv else "")
            except NotStarted as exc:
                self._drop(conn)
                if attempt:
                    return Completed(SSH_FAILED, "", f"connection to the head node lost: {exc}")
                get_logger().info("batch.paramiko_reconnect", host=self.target.destination, error=str(exc))
        raise AssertionError("unreachable")  # pragma: no cover

    async def start(self, argv: Sequence[str]) -> Lasting:
        """Start ``argv`` on the head node on an exec channel that lasts as long as the job.

        Raises :class:`~wqsupervisor.batch.base.SubmitError` when the head
        node cannot be reached.
        """
        if self._closed:
            raise SubmitError("the head node's command connection is closed")
        command = self.command_line(argv)
        for attempt in range(2):
            conn = await self._connection()
            if isinstance(conn, Completed):
                raise SubmitError(f"cannot start {argv[0]} on the head node: {conn.error_text}")
            assert self._threads is not None
            try:
                chan = await self._threads.call(
                    open_lasting, conn.transport, command, self.target.connect_timeout, discard=close_channel
                )
            except NotStarted as exc:
                self._drop(conn)
                if attempt:
                    raise SubmitError(f"cannot start {argv[0]} on the head node: {exc}") from None
                continue
            except _LOST as exc:
                raise SubmitError(f"cannot start {argv[0]} on the head node: {exc}") from None
            job = ChannelJob(next(self._serials), chan, self._threads)
            if self._threads.spawn(job.follow, name="wqs-runner-job") is None:
                close_channel(chan)
                raise SubmitError("the head node's command connection is closed")
            return job
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        """Close the connection (which ends the jobs still on it) and wait for the runner's threads."""
        self._closed = True
        conn, self._conn = self._conn, None
        dialer, self._dialer = self._dialer, None
        threads = self._threads
        if dialer is not None:
            await asyncio.to_thread(dialer.close)
        elif conn is not None:
            await asyncio.to_thread(conn.close)
        if threads is not None:
            threads.end()
            await threads.join(_JOIN_TIMEOUT)

    # -- the connection --------------------------------------------------------------------

    def _alive(self) -> bool:
        return self._conn is not None and bool(self._conn.transport.is_active())

    def _drop(self, conn: Connection) -> None:
        """Forget a lost connection and close it (in its own thread: closing joins)."""
        if self._conn is conn:
            self._conn = None
            dialer, self._dialer = self._dialer, None
            if dialer is not None and self._threads is not None:
                dialer.stop()
                self._threads.spawn(dialer.close, name="wqs-runner-close")

    async def _connection(self) -> Connection | Completed:
        """The live connection, made (again) if needed; a 255 Completed when no head could be reached."""
        if self._threads is None:
            self._threads = SessionThreads(
                asyncio.get_running_loop(),
                lambda: WQSupervisorError("the head node's command connection is closed"),
            )
            self._connecting = asyncio.Lock()
        assert self._connecting is not None
        async with self._connecting:
            if self._conn is not None and self._alive():
                return self._conn
            if self._conn is not None:
                self._drop(self._conn)
            errors = []
            for step in range(len(self.heads)):
                at = (self._at + step) % len(self.heads)
                try:
                    self._conn = await self._connect(at)
                except _LOST as exc:
                    errors.append(self._why(at, exc))
                    continue
                self._at = at
                self.connects += 1
                return self._conn
            return Completed(SSH_FAILED, "", "\n".join(errors))

    async def _connect(self, at: int) -> Connection:
        target = self.heads[at]
        if at not in self._configs:
            # In a thread: a 'Match exec' line runs a command.
            self._configs[at] = await asyncio.to_thread(read_head, target)
        cfg = self._configs[at]
        assert self._threads is not None
        self._notes = []
        dialer = Dialer(
            target.connect_timeout,
            notes=self._notes,
            fast_cipher=target.option("Ciphers") is None,
            adopt=self._threads.adopt,
        )
        self._dialer = dialer
        try:
            conn: Connection = await self._threads.call(dialer.connect, cfg, discard=lambda c: c.close())
        except BaseException:
            self._dialer = None
            dialer.stop()
            self._threads.spawn(dialer.close, name="wqs-runner-close")
            raise
        conn.transport.set_keepalive(5)
        return conn

    def _why(self, at: int, exc: BaseException) -> str:
        target, cfg = self.heads[at], self._configs.get(at)
        where = f"{cfg.hostname} port {cfg.port}" if cfg else target.destination
        failure = failure_of(exc, target.destination, where, authenticated=False)
        # The notes say which keys were skipped (unreadable, encrypted).
        return " ".join(part for part in (*self._notes, failure.message, failure.hint) if part)

    # -- one command ---------------------------------------------------------------------------

    async def _exec(
        self, conn: Connection, command: str, stdin: bytes, timeout: float, program: str
    ) -> Completed:
        assert self._threads is not None
        opened: list[Any] = []
        call = self._threads.call(exec_blocking, conn.transport, command, stdin, timeout, program, opened)
        try:
            # The thread keeps its own deadline; this one covers a request the head never answers.
            return await asyncio.wait_for(call, timeout + 1)
        except TimeoutError:
            return timed_out(program, timeout)
        except _LOST as exc:
            if not conn.transport.is_active():
                self._drop(conn)
            return Completed(SSH_FAILED, "", f"connection to the head node lost: {exc}")
        finally:
            # Wakes the thread if it still waits (a timeout here, or the caller was cancelled).
            for chan in opened:
                with contextlib.suppress(Exception):
                    chan.close()

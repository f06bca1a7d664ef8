"""The tunnel: one reverse forward from the head node to this master, kept alive.

A :class:`Tunnel` runs attempts one after another. An attempt starts ssh,
waits for its session, proves that the head node's remote port reaches *this*
master, and then watches it until it ends; the restart policy decides what
comes next. Every state change goes through :meth:`Tunnel._transition`, which
refuses the ones that make no sense::

    NEW -> CONNECTING -> UP <-> STALLED
               |          |        |
               v          v        v
             DOWN <-------+--------+ -> CONNECTING ...
               |
               v
            FAILED        (any) -> CLOSED

A restart closes every worker's connection, and a worker that loses its
master kills the tasks it runs, so a silent session is not restarted on
sight. It is STALLED: kept while the head node cannot be reached (a new
session could not be opened anyway), and replaced only once a fresh
connection reaches the head and the old session has had its chance to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import os
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import connection, openssh
from .backoff import GiveUp, RestartState
from .clock import Clock, SystemClock
from .config import Settings
from .errors import AuthenticationFailed, ProtocolError, TunnelError
from .events import (
    Event,
    StalePortReclaimed,
    TunnelClosed,
    TunnelDown,
    TunnelFailed,
    TunnelRestarting,
    TunnelResumed,
    TunnelStalled,
    TunnelStarting,
    TunnelUp,
)
from .forward import ForwardCheck
from .lifecycle import TunnelState
from .logs import get_logger
from .master import MasterIdentity, MasterInfo
from .remote import end_stale_session, inspect_port
from .wqproto import NO_CREDENTIALS, Credentials, request_status

# How long a silent session may take to answer once the head is reachable again:
# about one capped retransmission when we own the socket, TCP's own backoff when not.
GRACE_CAPPED = 2.0
GRACE_UNCAPPED = 12.0


@dataclass
class _Attempt:
    """How one attempt ended."""

    up_for: float | None
    reason: str
    exit_code: int | None = None
    failure: openssh.SshFailure | None = None
    # The head's sshd session that may still hold the remote port, to end first.
    stale_pid: int | None = None
    # A stale session was just cleared away: try again without waiting.
    retry_now: bool = False

    @property
    def permanent(self) -> bool:
        return self.failure is not None and self.failure.permanent


@dataclass
class TunnelRecord:
    """Counters kept for status output and the closing summary."""

    restarts: int = 0
    recoveries: list[float] = field(default_factory=list)
    last_error: str | None = None
    last_rtt: float | None = None
    verified_by: str | None = None
    session_pid: int | None = None
    remote_pid: int | None = None
    stalls: int = 0
    resumes: int = 0
    reclaims: int = 0
    rto_lifted: bool = False


DirectProbe = Callable[[float], Awaitable[list[dict[str, Any]] | None]]


class _NoConnection(Exception):
    """The supervisor's own TCP connection to the head failed (worded as ssh would)."""


class Tunnel:
    """A supervised reverse forward for one master."""

    def __init__(
        self,
        settings: Settings,
        master: MasterInfo,
        *,
        emit: Callable[[Event], None],
        rundir: str,
        direct_probe: DirectProbe,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        credentials: Credentials = NO_CREDENTIALS,
        label: str | None = None,
    ) -> None:
        settings.require_tunnel()
        if settings.remote_bind not in ("127.0.0.1", "localhost", "::1"):
            get_logger().warning(
                "tunnel.remote_port_exposed",
                bind=settings.remote_bind,
                remote_port=settings.remote_port,
                note="every host that reaches the head node can connect to the master through this port",
            )
        self.settings = settings
        self.master = master
        self.label = label or f"{settings.via}:{settings.remote_port}"
        self._emit_to = emit
        self._rundir = rundir
        self._direct_probe = direct_probe
        self._clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._credentials = credentials
        self._state = TunnelState.NEW
        self._since = self._clock.monotonic()
        self._restart = RestartState()
        self._policy = settings.restart_policy
        self._closing = asyncio.Event()
        self._session: openssh.OpenSSHSession | None = None
        self._ssh_config: openssh.SshConfig | None = None
        self._extra: list[str] = []
        self._handoff: connection.Handoff | None = None
        self._identity: MasterIdentity | None = None
        self._down_at: float | None = None
        self._finished = False
        self._quick_retries = 0
        self.remote_port: int = settings.remote_port or 0
        self.record = TunnelRecord()
        self.failure: TunnelError | None = None
        self.up_event = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------

    @property
    def state(self) -> TunnelState:
        """The current state."""
        return self._state

    @property
    def since(self) -> float:
        """Monotonic time of the last state change."""
        return self._since

    @property
    def owns_socket(self) -> bool:
        """True when the supervisor opens the TCP connection and hands it to ssh."""
        return self._handoff is not None

    @property
    def grace(self) -> float:
        """Seconds a silent session gets to resume once the head answers again."""
        return GRACE_CAPPED if self.owns_socket and connection.rto_cap_supported() else GRACE_UNCAPPED

    def _transition(self, new: TunnelState) -> None:
        self._state = self._state.to(new)
        self._since = self._clock.monotonic()
        if new is TunnelState.UP:
            self.up_event.set()
        else:
            self.up_event.clear()

    def _emit(self, cls: type[Event], **fields: Any) -> None:
        self._emit_to(cls(at=self._clock.wall(), source=self.label, **fields))

    def __repr__(self) -> str:
        return f"<Tunnel {self.label} {self._state.name}>"

    def snapshot(self) -> dict[str, Any]:
        """The tunnel's state for status output."""
        rec = self.record
        tcp = None
        if self._session is not None and self._session.sock is not None:
            info = connection.tcp_info(self._session.sock)
            tcp = info.__dict__ if info is not None else None
        return {
            "label": self.label,
            "via": self.settings.via,
            "remote_port": self.remote_port,
            "master_port": self.master.port,
            "state": self._state.value,
            "since": self._clock.wall() - (self._clock.monotonic() - self._since),
            "restarts": rec.restarts,
            "stalls": rec.stalls,
            "resumes": rec.resumes,
            "reclaims": rec.reclaims,
            "last_error": rec.last_error,
            "rtt_ms": round(rec.last_rtt * 1000, 2) if rec.last_rtt is not None else None,
            "verified_by": rec.verified_by,
            "ssh_pid": rec.session_pid,
            "remote_pid": rec.remote_pid,
            "recoveries": [round(r, 3) for r in rec.recoveries[-20:]],
            "socket": "owned" if self.owns_socket else "ssh",
            "rto_capped": self.owns_socket and connection.rto_cap_supported() and not rec.rto_lifted,
            "resume_grace": self.grace,
            "tcp": tcp,
        }

    async def close(self) -> None:
        """Stop the tunnel; returns once ssh is gone. A failed tunnel stays failed until closed."""
        self._closing.set()
        if self._session is not None:
            await self._session.close()
        if self._finished:
            self._closed()

    def _closed(self) -> None:
        if self._state is not TunnelState.CLOSED:
            self._transition(TunnelState.CLOSED)
            self._emit(TunnelClosed, restarts=self.record.restarts)

    def kill_now(self) -> None:
        """SIGKILL the ssh child at once (the supervisor is going away)."""
        if self._session is not None:
            self._session.kill_now()

    # -- the loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Run attempts until the tunnel fails for good or is closed."""
        try:
            await self._prepare()
            stale_pid: int | None = None
            while not self._closing.is_set():
                if stale_pid is not None:
                    await self._end_stale(stale_pid)
                attempt = await self._attempt()
                if self._closing.is_set():
                    break
                stale_pid = attempt.stale_pid
                if self._state in (TunnelState.UP, TunnelState.STALLED, TunnelState.CONNECTING):
                    self._transition(TunnelState.DOWN)
                    self._down_at = self._down_at or self._clock.monotonic()
                    self._emit(
                        TunnelDown, reason=attempt.reason, exit_code=attempt.exit_code, up_for=attempt.up_for
                    )
                self.record.last_error = attempt.reason
                if attempt.retry_now:
                    continue
                self._restart, decision = self._restart.after_attempt(
                    self._policy,
                    up_for=attempt.up_for,
                    permanent=attempt.reason if attempt.permanent else None,
                    rand=self._rng.random(),
                )
                if isinstance(decision, GiveUp):
                    hint = attempt.failure.hint if attempt.failure else "check the head node and the settings"
                    message = attempt.reason if attempt.permanent else f"{attempt.reason} ({decision.reason})"
                    self._fail(TunnelError(message, hint))
                    return
                self.record.restarts += 1
                self._emit(
                    TunnelRestarting,
                    delay=round(decision.delay, 3),
                    attempt=self._restart.attempts + 1,
                    why=attempt.reason,
                )
                await self._pause(decision.delay)
        except TunnelError as exc:
            self._fail(exc)
        except Exception as exc:
            # A bug of ours must not leave the tunnel silently dead: say so, stop.
            get_logger().exception("tunnel.crashed", source=self.label)
            self._fail(TunnelError(f"internal error: {exc!r}", "please report this as a bug"))
        finally:
            self._finished = True
            if self._session is not None:
                await self._session.close()
                self._session = None
            if self._closing.is_set() or self._state is not TunnelState.FAILED:
                self._closed()

    def _fail(self, exc: TunnelError) -> None:
        self.failure = exc
        self.record.last_error = exc.message
        if self._state is not TunnelState.FAILED:
            if not self._state.can_become(TunnelState.FAILED):
                self._transition(TunnelState.DOWN)
            self._transition(TunnelState.FAILED)
        self._emit(TunnelFailed, error=exc.message, hint=exc.hint or "")

    async def _pause(self, delay: float) -> None:
        """Sleep before a restart; cut short when the tunnel is closed or the head answers again."""
        if delay <= 0:
            return
        closing = asyncio.create_task(self._closing.wait())
        waits: set[asyncio.Task[Any]] = {closing}
        head = asyncio.create_task(self._head_returns()) if delay > 1.0 else None
        if head is not None:
            waits.add(head)
        try:
            done, _ = await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        if head is not None and head in done:
            self._restart = self._restart.wake_early()

    async def _head_returns(self) -> None:
        """Complete once the head's sshd, unreachable at first, greets a fresh connection again.

        Only a change from unreachable to reachable counts: a head that was
        reachable all along gives no reason to skip the backoff.
        """
        was_down = False
        while True:
            up = await self._head_reachable(timeout=1.0)
            if up and was_down:
                return
            was_down = was_down or not up
            await self._clock.sleep(0.5)

    async def _prepare(self) -> None:
        self._ssh_config = await openssh.read_config(self.settings)
        self._extra = await openssh.cipher_preference(self.settings, self._ssh_config)
        if self.settings.own_socket and not self._ssh_config.proxied and connection.fd_passing_supported():
            self._handoff = connection.Handoff(self._rundir, str(self.master.port))
        if self.remote_port == 0:
            self.remote_port = await self._allocate_remote_port()
            self.label = f"{self.settings.via}:{self.remote_port}"

    async def _start(
        self,
        probe_path: str | None,
        *,
        reverse: bool = True,
        remote_port: int | None = None,
    ) -> openssh.OpenSSHSession:
        """Start one ssh, on a connection of our own when we can; raises _NoConnection."""
        port = self.remote_port if remote_port is None else remote_port
        # --- paramiko backend hook (see wqsupervisor/paramiko_backend.py) ---
        if self.settings.backend == "paramiko":
            from .paramiko_backend import ParamikoSession

            assert self._ssh_config is not None
            master_port = self.master.port if reverse else None
            return await ParamikoSession.start(  # type: ignore[return-value]  # same surface
                self.settings, self._ssh_config, master_port=master_port, remote_port=port
            )
        # --- end of the paramiko backend hook ---
        argv = openssh.tunnel_argv(
            self.settings,
            master_port=self.master.port if reverse else None,
            remote_port=port,
            probe_path=probe_path,
            extra=[*self._extra, *(self._handoff.ssh_options() if self._handoff else [])],
        )
        if self._handoff is None:
            return await openssh.OpenSSHSession.start(argv, probe_path)
        cfg = self._ssh_config
        assert cfg is not None
        try:
            sock = await connection.open_connection(cfg.hostname, cfg.port, self.settings.connect_timeout)
        except OSError as exc:
            raise _NoConnection(str(exc)) from None
        try:
            async with self._handoff.offer(sock, self.settings.connect_timeout) as handed:
                session = await openssh.OpenSSHSession.start(argv, probe_path, sock=sock)
                await asyncio.wait(
                    [handed, asyncio.create_task(session.exited())],
                    timeout=self.settings.connect_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        except BaseException:
            sock.close()
            raise
        return session

    async def _allocate_remote_port(self) -> int:
        """Let the head node pick a free port once; later restarts ask for that same port."""
        try:
            session = await self._start(None, remote_port=0)
        except _NoConnection as exc:
            raise openssh.SshFailure.from_output(
                str(exc), 255, self.settings, ever_up=False
            ).as_error() from None
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await session.established()
                while (port := openssh.allocated_port(session.stderr)) is None:
                    await asyncio.sleep(0.02)
            return port
        except (openssh.SessionEnded, TimeoutError):
            code = await session.close()
            failure = openssh.SshFailure.from_output(session.stderr, code, self.settings, ever_up=False)
            raise failure.as_error() from None
        finally:
            await session.close()

    # -- one attempt ----------------------------------------------------------------

    async def _attempt(self) -> _Attempt:
        self._transition(TunnelState.CONNECTING)
        started = self._clock.monotonic()
        probe_path = os.path.join(self._rundir, f"probe-{self.master.port}.sock")
        try:
            session = await self._start(probe_path)
        except _NoConnection as exc:
            self._emit(TunnelStarting, attempt=self._restart.attempts + 1, pid=None)
            failure = openssh.SshFailure.from_output(
                str(exc), 255, self.settings, ever_up=self._restart.ever_up
            )
            return _Attempt(up_for=None, reason=failure.message, exit_code=None, failure=failure)
        except OSError as exc:
            raise TunnelError(
                f"cannot run {self.settings.ssh_program}: {exc}",
                "install the OpenSSH client (apt-get install openssh-client) or set ssh_program",
            ) from exc
        self._session = session
        self.record.session_pid = session.pid
        self._emit(TunnelStarting, attempt=self._restart.attempts + 1, pid=session.pid)
        try:
            try:
                async with asyncio.timeout(self.settings.connect_timeout):
                    await session.established()
                    verified_by = await self._verify(session)
            except TimeoutError:
                await session.close()
                return await self._ended(
                    session, f"no verified forward within {self.settings.connect_timeout:g} s"
                )
            except openssh.SessionEnded:
                return await self._ended(session, None)
            self.record.remote_pid = session.remote_pid
            self.record.verified_by = verified_by
            self._transition(TunnelState.UP)
            up_at = self._clock.monotonic()
            took = up_at - (self._down_at if self._down_at is not None else started)
            if self._down_at is not None:
                self.record.recoveries.append(took)
            self._down_at = None
            self._quick_retries = 0
            self._emit(
                TunnelUp,
                remote_port=self.remote_port,
                verified_by=verified_by,
                took=round(took, 4),
                restarts=self.record.restarts,
            )
            reason, code, replaced = await self._watch(session)
            if replaced:
                # The old session stayed silent after the head came back: its
                # sshd on the head still holds the port; end it before restarting.
                self._down_at = self._clock.monotonic()
            return _Attempt(
                up_for=self._clock.monotonic() - up_at,
                reason=reason,
                exit_code=code,
                stale_pid=session.remote_pid if replaced else None,
            )
        finally:
            await session.close()
            self._session = None

    async def _ended(self, session: openssh.OpenSSHSession, reason: str | None) -> _Attempt:
        """Turn an attempt that never came up into an outcome, reclaiming a stale port if that is why."""
        code = await session.exited()
        failure = openssh.SshFailure.from_output(
            session.stderr, code, self.settings, ever_up=self._restart.ever_up
        )
        if failure.kind == "port_taken" and self._just_dropped():
            # Our previous session is still being torn down on the head node and
            # holds the port for a moment longer: a short wait beats an inspection.
            self._quick_retries += 1
            await asyncio.sleep(0.1 * self._quick_retries)
            return _Attempt(up_for=None, reason=failure.message, exit_code=code, retry_now=True)
        if failure.kind == "port_taken":
            taken = await self._reclaim()
            if taken is None:
                return _Attempt(
                    up_for=None,
                    reason=f"remote port {self.remote_port} was held by a stale session; reclaimed",
                    exit_code=code,
                    retry_now=True,
                )
            failure = taken
        return _Attempt(up_for=None, reason=reason or failure.message, exit_code=code, failure=failure)

    def _just_dropped(self) -> bool:
        """True for the first few port refusals right after a session of ours ended."""
        recent = self._down_at is not None and self._clock.monotonic() - self._down_at < 1.5
        return recent and self._quick_retries < 4

    # -- the remote port -----------------------------------------------------------------

    async def _end_stale(self, pid: int) -> None:
        if await end_stale_session(self.settings, pid, self.remote_port):
            self.record.reclaims += 1
            self._emit(StalePortReclaimed, remote_port=self.remote_port, pid=pid)

    async def _reclaim(self) -> openssh.SshFailure | None:
        """Free the remote port from a stale sshd session of ours; never touch anything else.

        Returns None when the port is free (again), or the failure to report.
        """
        holders = await inspect_port(self.settings, self.remote_port)
        if not holders.bound:
            return None
        known = {self.record.remote_pid} if self.record.remote_pid else set()
        stale = holders.stale_candidates(known=known)
        if stale and not set(stale) <= known:
            # An sshd of ours that this tunnel did not start (an earlier run?). If a
            # master still answers through it, it is someone's live tunnel: leave it.
            owner = await self._port_owner()
            if owner is not None and not owner.matches(self._expected_identity()):
                return openssh.SshFailure(
                    "port_taken",
                    f"remote port {self.remote_port} on {self.settings.via} is in use by another live tunnel "
                    f"of yours, to the {owner}",
                    "give each master its own --remote-port",
                    permanent=True,
                    port=self.remote_port,
                )
        if stale:
            for pid in stale:
                await self._end_stale(pid)
            return None
        return openssh.SshFailure(
            "port_taken",
            f"remote port {self.remote_port} on {self.settings.via} is in use by {holders.describe()}",
            f"pick another --remote-port, or stop what holds port {self.remote_port} on the head node",
            permanent=True,
            port=self.remote_port,
        )

    async def _port_owner(self) -> MasterIdentity | None:
        """Which master answers on the head's remote port through a one-off session, if any."""
        probe_path = os.path.join(self._rundir, f"owner-{self.master.port}.sock")
        try:
            session = await self._start(probe_path, reverse=False)
        except (_NoConnection, OSError):
            return None
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                await session.established()
            reply = await request_status(session.open_probe, credentials=self._credentials, timeout=2.0)
            return MasterIdentity.from_status(reply[0]) if reply else None
        except (openssh.SessionEnded, TimeoutError, OSError, ProtocolError, AuthenticationFailed):
            return None
        finally:
            await session.close()

    def _expected_identity(self) -> MasterIdentity:
        return self._identity or MasterIdentity(port=self.master.port, project=self.master.name)

    # -- proving the forward ------------------------------------------------------------

    async def _verify(self, session: openssh.OpenSSHSession) -> str:
        """Probe until the remote port reaches this master; returns how it was proven.

        A master outside ``wait()`` never answers, so the probe waits only a few
        round trips of this very session (measured first) before it settles
        for a connection held open: a refusal would have come back by then.
        """
        rtt = await session.ping()
        patience = min(0.5, max(0.15, 4 * rtt + 0.1))
        pause = 0.02
        while True:
            check = await self.check_forward(session, timeout=patience)
            if check is ForwardCheck.REACHED:
                return "status"
            if check is ForwardCheck.HELD:
                return "connect"
            if check is ForwardCheck.WRONG:
                raise TunnelError(
                    f"remote port {self.remote_port} on {self.settings.via} leads to another master, not "
                    f"the {self._expected_identity()}",
                    "pick another --remote-port",
                )
            if not session.running:
                raise openssh.SessionEnded(await session.exited(), session.stderr)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)

    async def check_forward(self, session: openssh.OpenSSHSession, timeout: float = 2.0) -> ForwardCheck:
        """Send ``queue_status`` into the head's remote port, and to the master directly.

        No answer through the head while the master answers here means the
        forward is lost; no answer from either means the application is
        outside ``wait()``, and a connection held open proves the path as far
        as the master's listening socket.
        """
        through = asyncio.create_task(
            request_status(session.open_probe, credentials=self._credentials, timeout=timeout)
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
        if seen is None or not self._expected_identity().matches(seen):
            return ForwardCheck.WRONG
        return ForwardCheck.REACHED

    # -- watching a live session ------------------------------------------------------------

    async def _watch(self, session: openssh.OpenSSHSession) -> tuple[str, int | None, bool]:
        """Watch an up session until it ends or must be replaced: (reason, exit code, replaced)."""
        s = self.settings
        exited = asyncio.create_task(session.exited())
        closing = asyncio.create_task(self._closing.wait())
        ping: asyncio.Task[float] | None = None
        ping_sent = -s.keepalive_interval
        last_pong = self._clock.monotonic()
        next_probe = last_pong + s.probe_interval
        probe: asyncio.Task[ForwardCheck] | None = None
        lost_streak = 0
        stall: _Stall | None = None
        try:
            while True:
                done, _ = await asyncio.wait(
                    [exited, closing],
                    timeout=min(s.keepalive_interval, 0.25),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if closing in done:
                    return "closed", None, False
                if exited in done:
                    code = exited.result()
                    failure = openssh.SshFailure.from_output(session.stderr, code, s, ever_up=True)
                    return failure.message, code, False
                now = self._clock.monotonic()
                if ping is not None and ping.done():
                    if ping.exception() is None:
                        last_pong = now
                        self.record.last_rtt = ping.result()
                    ping = None
                if ping is None and now - ping_sent >= s.keepalive_interval:
                    ping_sent = now
                    ping = asyncio.create_task(session.ping())
                silent = now - last_pong
                if stall is None and silent > s.stall_after:
                    self._transition(TunnelState.STALLED)
                    self.record.stalls += 1
                    stall = _Stall(began=now, silent_since=last_pong, grace=self.grace)
                    lost_streak = 0
                    self._emit(
                        TunnelStalled, silent_for=round(silent, 2), reason="no answer through the session"
                    )
                elif stall is not None and silent <= s.stall_after:
                    self._transition(TunnelState.UP)
                    self.record.resumes += 1
                    self._emit(TunnelResumed, stalled_for=round(now - stall.began, 2))
                    if self.record.rto_lifted:
                        self._cap_retransmissions(True)
                    stall.cancel()
                    stall = None
                    next_probe = now + s.probe_interval
                elif stall is not None:
                    verdict = stall.step(self, now)
                    if verdict is not None:
                        return verdict, None, True
                if probe is not None and probe.done():
                    check = probe.result() if probe.exception() is None else ForwardCheck.REFUSED
                    probe = None
                    if stall is None:
                        lost_streak = (
                            lost_streak + 1 if check in (ForwardCheck.LOST, ForwardCheck.REFUSED) else 0
                        )
                        if check is ForwardCheck.WRONG or lost_streak >= 2:
                            return f"the remote port stopped reaching the master ({check.value})", None, False
                if probe is None and stall is None and now >= next_probe:
                    next_probe = now + s.probe_interval
                    probe = asyncio.create_task(self.check_forward(session))
        finally:
            closing.cancel()
            if stall is not None:
                stall.cancel()
            for task in (ping, probe):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

    async def _head_reachable(self, timeout: float) -> bool:
        """True when a fresh TCP connection to the head's sshd gets an SSH banner."""
        return await self._probe_head(timeout) is Reach.UP

    async def _probe_head(self, timeout: float) -> Reach:
        """Open a fresh connection to the head's sshd: does it greet us, and if not, is there a route?"""
        cfg = self._ssh_config
        if cfg is None or cfg.proxied:
            return Reach.UP if await self._head_reachable_via_ssh(timeout) else Reach.DOWN
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    cfg.hostname, cfg.port, family=socket.AF_UNSPEC
                )
                try:
                    banner = await reader.readline()
                finally:
                    writer.close()
            return Reach.UP if banner.startswith(b"SSH-") else Reach.DOWN
        except TimeoutError:
            return Reach.DOWN
        except OSError as exc:
            return Reach.NO_ROUTE if exc.errno in _NO_ROUTE else Reach.DOWN

    def _cap_retransmissions(self, on: bool) -> None:
        """Cap (or uncap) the session socket's retransmission backoff.

        With no route at all, Linux ends a connection after tcp_retries2 (15)
        failed retransmissions whatever TCP_USER_TIMEOUT says, so a 1 s cap
        would end the session after 15 s of a link that is down. Uncapped,
        the same 15 stretch over minutes; the cap returns with the route.
        """
        session = self._session
        if session is None or session.sock is None or not connection.rto_cap_supported():
            return
        with contextlib.suppress(OSError):
            connection.set_rto_cap(session.sock, on)
            self.record.rto_lifted = not on

    async def _head_reachable_via_ssh(self, timeout: float) -> bool:
        proc = await asyncio.create_subprocess_exec(
            *openssh.remote_argv(self.settings, "true"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            return await asyncio.wait_for(proc.wait(), timeout) == 0
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return False

    async def _direct(self, timeout: float) -> list[dict[str, Any]] | None:
        """The master's status asked on its own port; None when it does not answer."""
        try:
            return await self._direct_probe(timeout)
        except Exception:
            return None


class Reach(enum.Enum):
    """What a fresh connection to the head's sshd found."""

    UP = "up"
    DOWN = "down"  # no answer, or refused
    NO_ROUTE = "no route"  # this machine has no route there (link down, network gone)


_NO_ROUTE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN}


@dataclass
class _Stall:
    """Keep or replace a silent session.

    While fresh connections to the head fail, the session is kept: nothing
    better can be opened. Once one succeeds, the session gets ``grace``
    seconds to answer; if the head still answers fresh connections at the
    end of it, the session is replaced.
    """

    began: float
    silent_since: float
    grace: float
    reachable_at: float | None = None
    probing: asyncio.Task[Reach] | None = None

    def step(self, tunnel: Tunnel, now: float) -> str | None:
        """Advance the decision; returns the reason to replace the session, or None to keep it."""
        if self.probing is not None and self.probing.done():
            reach = self.probing.result() if self.probing.exception() is None else Reach.DOWN
            self.probing = None
            ok = reach is Reach.UP
            if reach is Reach.NO_ROUTE and not tunnel.record.rto_lifted:
                # Keep the session alive through the outage; it will resume on TCP's own schedule.
                tunnel._cap_retransmissions(False)
                self.grace = max(self.grace, GRACE_UNCAPPED)
            elif ok and tunnel.record.rto_lifted:
                tunnel._cap_retransmissions(True)
            if ok and self.reachable_at is None:
                self.reachable_at = now
            elif ok and self.reachable_at is not None and now - self.reachable_at >= self.grace:
                return (
                    f"session silent for {now - self.silent_since:.1f} s although the head node has "
                    f"answered fresh connections for {now - self.reachable_at:.1f} s; replacing it"
                )
            elif not ok:
                self.reachable_at = None
        if self.probing is None and (self.reachable_at is None or now - self.reachable_at >= self.grace):
            self.probing = asyncio.create_task(tunnel._probe_head(timeout=1.0))
        return None

    def cancel(self) -> None:
        """Stop a probe in flight."""
        if self.probing is not None:
            self.probing.cancel()

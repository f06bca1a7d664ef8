"""The tunnel: one reverse forward from the head node to this master, kept alive.

A :class:`Tunnel` runs attempts one after another. An attempt starts a
session (:mod:`wqsupervisor.session`, from the transport it was given), waits
for it, proves that the head node's remote port reaches *this* master
(:mod:`wqsupervisor.forward`), and then watches it until it ends
(:mod:`wqsupervisor.liveness` decides, :mod:`wqsupervisor.sessionwatch` looks and acts); the
restart policy (:mod:`wqsupervisor.backoff`) decides what comes next. The
remote port is :mod:`wqsupervisor.remoteport`'s. Every state change goes
through :meth:`Tunnel._transition` and the table in :mod:`wqsupervisor.lifecycle`.

A restart closes every worker's connection, and a worker that loses its
master kills the tasks it runs, so a silent session is not restarted on
sight. It is STALLED: kept while the head node cannot be reached (a new
session could not be opened anyway), and replaced only once a fresh
connection reaches the head and the old session has had its chance to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import tcpconn
from .backoff import GiveUp, RestartPolicy, RestartState
from .clock import Clock, SystemClock
from .errors import TunnelError
from .events import (
    Event,
    RelayReattached,
    RelayReleased,
    ResumptionOff,
    StalePortReclaimed,
    TunnelClosed,
    TunnelDown,
    TunnelFailed,
    TunnelMoved,
    TunnelRestarting,
    TunnelResumed,
    TunnelStalled,
    TunnelStarting,
    TunnelUp,
)
from .forward import DirectProbe, ForwardProver
from .headprobe import head_returns, probe_head
from .heads import Heads, Move
from .lifecycle import TunnelState
from .liveness import GRACE_CAPPED, GRACE_UNCAPPED, Liveness, Timing
from .logs import get_logger
from .master import MasterInfo
from .protocol.snapshot import TunnelSnapshot
from .remoteport import RemotePort
from .session import (
    Detachable,
    Resumable,
    Session,
    SessionEnded,
    SessionFactory,
    SessionFailed,
    SessionFailure,
)
from .sessionwatch import Reporter, watch
from .target import SshTarget
from .wqproto import NO_CREDENTIALS, Credentials

__all__ = ["GRACE_CAPPED", "GRACE_UNCAPPED", "Tunnel", "TunnelOptions", "TunnelRecord"]


# A relay left on a head the tunnel moved away from is ended once that head answers; tried again
# at most this often (seconds) while it does not.
RELEASE_RETRY_MAX = 30.0


@dataclass(frozen=True)
class TunnelOptions:
    """How one tunnel behaves: its remote port (0: the head picks), restarts and liveness intervals."""

    remote_port: int
    restart_policy: RestartPolicy
    timing: Timing


@dataclass
class _Attempt:
    """How one attempt ended."""

    up_for: float | None
    reason: str
    exit_code: int | None = None
    failure: SessionFailure | None = None
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


class Tunnel:
    """A supervised reverse forward for one master, over sessions from ``sessions``."""

    def __init__(
        self,
        target: SshTarget,
        options: TunnelOptions,
        master: MasterInfo,
        *,
        sessions: SessionFactory,
        emit: Callable[[Event], None],
        rundir: str,
        direct_probe: DirectProbe,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        credentials: Credentials = NO_CREDENTIALS,
        label: str | None = None,
        fallbacks: Sequence[tuple[SshTarget, SessionFactory]] = (),
    ) -> None:
        if not target.bind_is_loopback:
            get_logger().warning(
                "tunnel.remote_port_exposed",
                bind=target.bind,
                remote_port=options.remote_port,
                note="every host that reaches the head node can connect to the master through this port",
            )
        self.target = target
        self.options = options
        self.master = master
        self.label = label or f"{target.destination}:{options.remote_port}"
        self._sessions = sessions
        self._emit_to = emit
        self._rundir = rundir
        self._clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._state = TunnelState.NEW
        self._since = self._clock.monotonic()
        self._restart = RestartState()
        self._closing = asyncio.Event()
        self._session: Session | None = None
        self._down_at: float | None = None
        self._finished = False
        self._quick_retries = 0
        self._told_off = False
        self._prover = ForwardProver(master, direct_probe, credentials)
        self._port = self._remote_port()
        # Every head node it may use, in order (see wqsupervisor.heads); it is on the first.
        self._heads = [(target, sessions), *fallbacks]
        self._on = Heads(len(self._heads))
        self._at = 0  # the index in _heads of the head it is on
        self._prepared = {0}
        # Heads it moved away from whose relay may still hold workers: each is ended from here
        # as soon as its head can be reached again (see _release).
        self._left_behind: dict[int, asyncio.Task[None]] = {}
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
    def remote_port(self) -> int:
        """The head node's port that leads to the master (0 until the head has chosen one)."""
        return self._port.port

    @property
    def owns_socket(self) -> bool:
        """True when the supervisor opens the TCP connection the sessions run on."""
        return self._sessions.owns_socket

    @property
    def holds_workers(self) -> bool:
        """True when a head relay keeps the workers' connections across this tunnel's restarts."""
        sessions = self._sessions
        return (
            isinstance(sessions, Resumable) and sessions.off is None and sessions.relay_snapshot() is not None
        )

    @property
    def grace(self) -> float:
        """Seconds a silent session gets to resume once the head answers again."""
        return GRACE_CAPPED if self.owns_socket and tcpconn.rto_cap_supported() else GRACE_UNCAPPED

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

    def snapshot(self) -> TunnelSnapshot:
        """The tunnel's state for status output."""
        rec = self.record
        sock = self._session.sock if self._session is not None else None
        return TunnelSnapshot(
            label=self.label,
            via=self.target.destination,
            remote_port=self.remote_port,
            master_port=self.master.port,
            state=self._state,
            since=self._clock.wall() - (self._clock.monotonic() - self._since),
            restarts=rec.restarts,
            stalls=rec.stalls,
            resumes=rec.resumes,
            reclaims=rec.reclaims,
            last_error=rec.last_error,
            rtt_ms=round(rec.last_rtt * 1000, 2) if rec.last_rtt is not None else None,
            verified_by=rec.verified_by,
            ssh_pid=rec.session_pid,
            remote_pid=rec.remote_pid,
            recoveries=tuple(round(r, 3) for r in rec.recoveries[-20:]),
            socket="owned" if self.owns_socket else "ssh",
            rto_capped=self.owns_socket and tcpconn.rto_cap_supported() and not rec.rto_lifted,
            resume_grace=self.grace,
            tcp=tcpconn.tcp_info(sock) if sock is not None else None,
            relay=self._sessions.relay_snapshot() if isinstance(self._sessions, Resumable) else None,
            resume_off=self._sessions.off if isinstance(self._sessions, Resumable) else None,
            failed=self.failure.message if self.failure is not None else None,
        )

    async def close(self) -> None:
        """Stop the tunnel; returns once its session is gone. A failed tunnel stays failed until closed."""
        self._closing.set()
        if self._session is not None:
            await self._session.close()
        if isinstance(self._sessions, Resumable):
            # The session may have been down: the head relay must not wait out its linger.
            await self._sessions.end_relay()
        await self._end_left_behind()
        if self._finished:
            self._closed()

    def _closed(self) -> None:
        if self._state is not TunnelState.CLOSED:
            self._transition(TunnelState.CLOSED)
            self._emit(TunnelClosed, restarts=self.record.restarts)

    def kill_now(self) -> None:
        """End the session at once (the supervisor is going away)."""
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
                    await self._port.end_stale(stale_pid)
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
                self._on, move = self._on.after_attempt(attempt.up_for is not None, attempt.failure)
                if move is not None and move.at_once:
                    await self._move(move)
                    continue
                self._restart, decision = self._restart.after_attempt(
                    self.options.restart_policy,
                    up_for=attempt.up_for,
                    # A failure for good on the head it left is not one on the head it went to.
                    permanent=attempt.reason if attempt.permanent and move is None else None,
                    rand=self._rng.random(),
                    waits=attempt.failure is not None and attempt.failure.waits,
                )
                if isinstance(decision, GiveUp):
                    hint = attempt.failure.hint if attempt.failure else "check the head node and the settings"
                    message = attempt.reason if attempt.permanent else f"{attempt.reason} ({decision.reason})"
                    self._fail(TunnelError(message, hint))
                    return
                if move is not None:
                    await self._move(move)  # after a whole round of heads: its turn, after the delay below
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

    def _remote_port(self) -> RemotePort:
        """The remote port's keeper on the head node the tunnel is on."""
        return RemotePort(
            self.target, self._sessions, self._prover, self.options.remote_port, on_reclaimed=self._reclaimed
        )

    async def _move(self, move: Move) -> None:
        """Go on to another head node: its transport and its remote port (the restart backoff carries on)."""
        left, left_at = self.target.destination, self._at
        back = self._left_behind.pop(move.to, None)
        if back is not None:
            # Going back to a head whose relay was left waiting: reattach it, do not end it.
            back.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await back
        if isinstance(self._sessions, Resumable) and self._sessions.holds_relay:
            self._left_behind[left_at] = asyncio.create_task(
                self._release(left_at, self._clock.monotonic()), name=f"release-{left}"
            )
        self._at = move.to
        self.target, self._sessions = self._heads[move.to]
        self._port = self._remote_port()
        self._emit(TunnelMoved, left=left, to=self.target.destination, why=move.why)
        if move.to not in self._prepared:
            await self._sessions.prepare(self._rundir, str(self.master.port))
            self._prepared.add(move.to)

    async def _release(self, index: int, moved_at: float) -> None:
        """Let go of the relay left on head ``index``, and end it once that head answers again.

        Until the tunnel is up on another head it may still come back to this
        one (when campus itself is cut off, every head is out of reach and it
        goes back to the one its workers use): the relay and the master
        connections kept for its workers stay. Once it is up elsewhere, those
        workers are lost to this supervisor: the master connections kept for
        them close (the master retries their tasks now, not at its keepalive),
        and the relay is ended as soon as its head can be reached, so that any
        worker it still holds connects again through the head the tunnel is
        on. A head that stays out of reach keeps its relay until the relay's
        own linger ends it; trying is given up then.
        """
        target, sessions = self._heads[index]
        assert isinstance(sessions, Resumable)
        try:
            await self.up_event.wait()
            await sessions.let_go()
            wait = 1.0
            while self._clock.monotonic() - moved_at < sessions.linger:
                # Cancelled mid-attempt (the tunnel went back to that head), the attempt's own session
                # may still end the relay: its workers then connect again, their running tasks retried.
                if await sessions.end_relay():
                    after = round(self._clock.monotonic() - moved_at, 3)
                    self._emit(RelayReleased, head=target.destination, after=after)
                    return
                await self._clock.sleep(wait)
                wait = min(wait * 2, RELEASE_RETRY_MAX)
        except Exception:
            # A bug of ours: say so; the relay is left to its linger, the tunnel carries on.
            get_logger().exception("tunnel.release_crashed", source=self.label, head=target.destination)

    async def _end_left_behind(self) -> None:
        """close(): end every relay left on another head now, as far as each can be reached."""
        tasks, self._left_behind = list(self._left_behind.items()), {}
        for _index, task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for index, _task in tasks:
            sessions = self._heads[index][1]
            if isinstance(sessions, Resumable):
                await sessions.end_relay()

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
        head = None
        if delay > 1.0:
            head = asyncio.create_task(head_returns(self._sessions, self._clock))
            waits.add(head)
        try:
            done, _ = await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        if head is not None and head in done:
            self._restart = self._restart.wake_early()

    async def _prepare(self) -> None:
        await self._sessions.prepare(self._rundir, str(self.master.port))
        if self.remote_port == 0:
            await self._port.allocate()
            self.label = f"{self.target.destination}:{self.remote_port}"

    # -- one attempt ----------------------------------------------------------------

    async def _attempt(self) -> _Attempt:
        self._transition(TunnelState.CONNECTING)
        started = self._clock.monotonic()
        try:
            session = await self._sessions.start(
                master_port=self.master.port, remote_port=self.remote_port, probes="probe"
            )
        except SessionFailed as exc:
            self._emit(TunnelStarting, attempt=self._restart.attempts + 1, pid=None)
            failure = self._seen(exc.failure)
            return _Attempt(up_for=None, reason=failure.message, exit_code=None, failure=failure)
        self._session = session
        self.record.session_pid = session.pid
        self._emit(TunnelStarting, attempt=self._restart.attempts + 1, pid=session.pid)
        try:
            try:
                async with asyncio.timeout(self.target.connect_timeout):
                    await session.established()
                    verified_by = await self._prover.verify(
                        session, f"{self.remote_port} on {self.target.destination}"
                    )
            except TimeoutError:
                await self._let_go(session)
                return await self._ended(
                    session, f"no verified forward within {self.target.connect_timeout:g} s"
                )
            except SessionEnded:
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
            self._tell_relay(session)
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
            await self._let_go(session)
            self._session = None

    async def _let_go(self, session: Session) -> None:
        """End an attempt's session; a resumable one keeps its relay for the next unless we are closing."""
        if isinstance(session, Detachable) and not self._closing.is_set():
            await session.detach()
        else:
            await session.close()

    def _tell_relay(self, session: Session) -> None:
        """Events for resumable forwarding: off (once, with why), or a relay taken over."""
        sessions = self._sessions
        if not isinstance(sessions, Resumable):
            return
        if sessions.off is not None and not self._told_off:
            self._told_off = True
            self._emit(ResumptionOff, reason=sessions.off)
        relay = sessions.relay_snapshot()
        if isinstance(session, Detachable) and session.resumed and relay is not None:
            self._emit(
                RelayReattached,
                took=relay.last_took or 0.0,
                connections=relay.connections,
                buffered=relay.buffered,
            )

    def _seen(self, failure: SessionFailure) -> SessionFailure:
        """A failure as this tunnel takes it: some are final only before it was ever up."""
        return failure.once_up() if self._restart.ever_up else failure

    async def _ended(self, session: Session, reason: str | None) -> _Attempt:
        """Turn an attempt that never came up into an outcome, reclaiming a stale port if that is why."""
        code = await session.exited()
        failure = self._seen(session.failure())
        if failure.kind == "port_taken" and self._just_dropped():
            # Our previous session is still being torn down on the head node and
            # holds the port for a moment longer: a short wait beats an inspection.
            self._quick_retries += 1
            await asyncio.sleep(0.1 * self._quick_retries)
            return _Attempt(up_for=None, reason=failure.message, exit_code=code, retry_now=True)
        if failure.kind == "port_taken":
            taken = await self._port.reclaim(self.record.remote_pid)
            if taken is None:
                return _Attempt(
                    up_for=None,
                    reason=f"remote port {self.remote_port} was held by a stale session; reclaimed",
                    exit_code=code,
                    retry_now=True,
                )
            failure = self._seen(taken)
        return _Attempt(up_for=None, reason=reason or failure.message, exit_code=code, failure=failure)

    def _just_dropped(self) -> bool:
        """True for the first few port refusals right after a session of ours ended."""
        recent = self._down_at is not None and self._clock.monotonic() - self._down_at < 1.5
        return recent and self._quick_retries < 4

    def _reclaimed(self, pid: int) -> None:
        self.record.reclaims += 1
        self._emit(StalePortReclaimed, remote_port=self.remote_port, pid=pid)

    # -- watching a live session ------------------------------------------------------------

    async def _watch(self, session: Session) -> tuple[str, int | None, bool]:
        """Watch an up session until it ends or must be replaced: (reason, exit code, replaced)."""
        resumable = isinstance(self._sessions, Resumable) and self._sessions.off is None
        live = Liveness.start(
            self.options.timing,
            self._clock.monotonic(),
            grace=self.grace,
            rto_lifted=self.record.rto_lifted,
            resumable=resumable,
        )
        return await watch(
            session,
            live,
            clock=self._clock,
            closing=self._closing,
            probe_head=lambda: probe_head(self._sessions, timeout=1.0),
            check_forward=lambda: self._prover.check(session),
            report=Reporter(
                rtt=self._rtt,
                stalled=self._stalled,
                resumed=self._resumed,
                cap=functools.partial(self._cap_retransmissions, session),
            ),
        )

    def _rtt(self, seconds: float) -> None:
        self.record.last_rtt = seconds

    def _stalled(self, silent_for: float) -> None:
        self._transition(TunnelState.STALLED)
        self.record.stalls += 1
        self._emit(TunnelStalled, silent_for=round(silent_for, 2), reason="no answer through the session")

    def _resumed(self, stalled_for: float) -> None:
        self._transition(TunnelState.UP)
        self.record.resumes += 1
        self._emit(TunnelResumed, stalled_for=round(stalled_for, 2))

    def _cap_retransmissions(self, session: Session, on: bool) -> bool:
        """Cap (or uncap) the session socket's retransmission backoff; True when it was done.

        With no route at all, Linux ends a connection after tcp_retries2 (15)
        failed retransmissions whatever TCP_USER_TIMEOUT says, so a 1 s cap
        would end the session after 15 s of a link that is down. Uncapped,
        the same 15 stretch over minutes; the cap returns with the route.
        """
        if session.sock is None or not tcpconn.rto_cap_supported():
            return False
        try:
            tcpconn.set_rto_cap(session.sock, on)
        except OSError:
            return False
        self.record.rto_lifted = not on
        return True

"""The engine: supervision that never waits on the application.

``q.wait()`` of the ndcctools bindings holds the GIL for its whole duration,
so nothing that must react in time can live in the application's process.
The engine runs in its own process (the agent, for the drop-in wrapper) or in
the ``python -m wqsupervisor run`` parent, on one asyncio loop. For every
attached master it runs a :class:`~wqsupervisor.tunnel.Tunnel` and a stats
sampler that asks the master's own port for its status (``resources_status``).

Handles talk to it over a unix socket in the control protocol of
:mod:`wqsupervisor.protocol`; the engine answers each request and pushes
every event to every handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import rundir as rundirs
from ._version import __version__
from .backends import tunnel_for
from .clock import Clock, SystemClock
from .config import Settings
from .errors import WQSupervisorError
from .events import Event, JobSubmitFailed, MasterUnreachable, TunnelDown
from .jobs import FactoryTracker, JobTracker, build_tracker
from .kinds import kind_named
from .lifecycle import TunnelState
from .master import MasterInfo, MasterStats
from .passwords import read_password
from .protocol import (
    Ack,
    Adapt,
    Attach,
    Attached,
    Detach,
    ErrorReply,
    EventMessage,
    GetSnapshot,
    JobsSnapshot,
    MasterSnapshot,
    MasterSummary,
    Ping,
    Reply,
    ReportStats,
    SnapshotReply,
    Submitted,
    SupervisorSnapshot,
    TasksSnapshot,
    WorkersSnapshot,
    decode_request,
    encode,
)
from .tunnel import Tunnel
from .watch import WorkerWatch
from .wqproto import Credentials, request_status, tls_context

_RECENT_EVENTS = 50
# The longest request line: an attach with every setting is a few kilobytes.
MAX_REQUEST = 64 * 1024


# While the supervisor starts workers, the master is asked this often at least: it answers
# inside wait(), so a backlog is seen within this long of the script calling wait().
BACKLOG_INTERVAL = 0.1


def _sample_interval(settings: Settings) -> float:
    """Seconds between two samples of the master: shorter while workers are started from its backlog."""
    if settings.workers:
        return min(settings.stats_interval, BACKLOG_INTERVAL)
    return settings.stats_interval


def credentials_for(settings: Settings) -> Credentials:
    """What the probes and samples say to a master: its password and TLS, from the settings."""
    return Credentials(
        password=read_password(settings.password_file) if settings.password_file else None,
        tls=tls_context() if settings.ssl else None,
    )


@dataclass
class Supervised:
    """One attached master and what watches it."""

    id: str
    master: MasterInfo
    settings: Settings
    tunnel: Tunnel
    watch: WorkerWatch
    owner: object
    stats: MasterStats | None = None
    stats_at: float | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    master_gone: bool = False
    jobs: JobTracker | FactoryTracker | None = None
    sample_now: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the handle saw tasks submitted: the sampler asks the master without waiting."""

    def snapshot(self, clock: Clock) -> MasterSnapshot:
        """This master's part of the engine's snapshot."""
        st = self.stats or MasterStats()
        return MasterSnapshot(
            id=self.id,
            master=MasterSummary.of(self.master),
            # Tunnel and trackers still describe themselves as mappings; read them here, once.
            tunnel=self.tunnel.snapshot(),
            workers=WorkersSnapshot(
                connected=st.workers_connected,
                idle=st.workers_idle,
                busy=st.workers_busy,
                peak=self.watch.peak,
            ),
            tasks=TasksSnapshot(
                waiting=st.tasks_waiting,
                running=st.tasks_running,
                on_workers=st.tasks_on_workers,
                done=st.tasks_done,
                submitted=st.tasks_submitted,
            ),
            stats_age=round(clock.monotonic() - self.stats_at, 2) if self.stats_at else None,
            jobs=JobsSnapshot.from_dict(self.jobs.snapshot()) if self.jobs is not None else None,
        )


class Engine:
    """Supervises attached masters; emits events to every connected handle."""

    def __init__(self, *, clock: Clock | None = None, rundir: str | None = None) -> None:
        self.clock = clock or SystemClock()
        self._own_rundir = rundir is None
        self.rundir = rundir or rundirs.create()
        self._ids = itertools.count(1)
        self.masters: dict[str, Supervised] = {}
        self.finished: list[MasterSnapshot] = []
        self.recent: deque[Event] = deque(maxlen=_RECENT_EVENTS)
        self._sinks: list[Callable[[Event, str], None]] = []
        self._servers: list[tuple[asyncio.AbstractServer, str]] = []
        # Open connections (handles, status readers), ended by close() so that
        # no task of theirs is left pending when the loop goes.
        self._clients: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self.started = self.clock.wall()
        self.closed = asyncio.Event()

    # -- events ---------------------------------------------------------------

    def add_sink(self, sink: Callable[[Event, str], None]) -> Callable[[], None]:
        """Call ``sink(event, tunnel_state)`` for every event; returns the remover."""
        self._sinks.append(sink)
        return lambda: self._sinks.remove(sink) if sink in self._sinks else None

    def _emit_for(self, sup_id: str) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            sup = self.masters.get(sup_id)
            # A resumable tunnel's drop is not the workers': its head relay holds them.
            if sup is not None and isinstance(event, TunnelDown) and not sup.tunnel.holds_workers:
                sup.watch.note_tunnel_down(self.clock.monotonic())
            state = sup.tunnel.state.value if sup is not None else "closed"
            self.recent.append(event)
            for sink in list(self._sinks):
                sink(event, state)

        return emit

    # -- masters --------------------------------------------------------------

    def attach(self, master: MasterInfo, settings: Settings, owner: object = None) -> Supervised:
        """Start supervising ``master``: its tunnel and its stats sampler."""
        settings.require_tunnel()
        taken = {s.tunnel.remote_port for s in self.masters.values() if s.settings.via == settings.via}
        if settings.remote_port and settings.remote_port in taken:
            # Several masters in one run: the next free port after the one given.
            port = settings.remote_port
            while port in taken:
                port += 1
            settings = settings.replace(remote_port=port)
        sup_id = f"m{next(self._ids)}"
        emit = self._emit_for(sup_id)
        credentials = credentials_for(settings)

        async def direct(timeout: float) -> list[dict[str, Any]] | None:
            return await self._ask_master(master.port, credentials, timeout=timeout)

        tunnel = tunnel_for(
            settings,
            master,
            emit=emit,
            rundir=self.rundir,
            direct_probe=direct,
            clock=self.clock,
            credentials=credentials,
        )
        sup = Supervised(
            id=sup_id,
            master=master,
            settings=settings,
            tunnel=tunnel,
            watch=WorkerWatch(source=f"master:{master.port}"),
            owner=owner,
        )
        self.masters[sup_id] = sup
        sup.tasks.append(asyncio.create_task(tunnel.run(), name=f"tunnel-{sup_id}"))
        sup.tasks.append(asyncio.create_task(self._sample(sup, credentials, emit), name=f"stats-{sup_id}"))
        if settings.workers:
            sup.tasks.append(asyncio.create_task(self._scale(sup, emit), name=f"jobs-{sup_id}"))
        return sup

    async def _scale(self, sup: Supervised, emit: Callable[[Event], None]) -> None:
        """Start workers for one master once its tunnel has been up (the remote port is known)."""
        await sup.tunnel.up_event.wait()
        try:
            sup.jobs = await build_tracker(
                sup.settings,
                sup.master.port,
                sup.tunnel.remote_port,
                emit=emit,
                stats=lambda: sup.stats,
                tunnel_up=lambda: sup.tunnel.state is TunnelState.UP,
                source=f"workers:{sup.settings.workers}",
                clock=self.clock,
                rundir=self.rundir,
                kind=kind_named(sup.master.kind),
            )
        except WQSupervisorError as exc:
            emit(
                JobSubmitFailed(
                    at=self.clock.wall(),
                    source=f"workers:{sup.settings.workers}",
                    system=str(sup.settings.workers),
                    error=exc.message,
                    hint=exc.hint or "",
                )
            )
            return
        await sup.jobs.run()

    async def detach(self, sup_id: str) -> None:
        """Stop supervising one master: close its tunnel and stop its sampler."""
        sup = self.masters.get(sup_id)
        if sup is None:
            return
        if sup.jobs is not None:
            # Cancel every job it submitted while its scheduler is still reachable.
            with contextlib.suppress(Exception):
                await sup.jobs.close()
        await sup.tunnel.close()
        runner, *others = sup.tasks
        for task in others:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(runner), 10)
        runner.cancel()
        await asyncio.gather(*sup.tasks, return_exceptions=True)
        self.finished.append(sup.snapshot(self.clock))
        self.masters.pop(sup_id, None)

    async def close(self) -> None:
        """Detach everything, stop serving, remove the run directory."""
        for sup_id in list(self.masters):
            await self.detach(sup_id)
        for server, path in self._servers:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
            with contextlib.suppress(OSError):
                os.unlink(path)
        await self._end_clients()
        if self._own_rundir:
            rundirs.remove(self.rundir)
        self.closed.set()

    async def _end_clients(self, grace: float = 5.0) -> None:
        """Hang up on every connection still open and wait for its task to end."""
        for writer in self._clients.values():
            writer.close()
        tasks = list(self._clients)
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def kill_children_now(self) -> None:
        """SIGKILL every ssh child at once (the engine's process is about to die)."""
        for sup in self.masters.values():
            sup.tunnel.kill_now()

    @staticmethod
    async def _ask_master(port: int, credentials: Credentials, timeout: float) -> list[dict[str, Any]] | None:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", port)

        try:
            return await request_status(connect, credentials=credentials, timeout=timeout)
        except TimeoutError:
            return None

    async def _sample(self, sup: Supervised, credentials: Credentials, emit: Callable[[Event], None]) -> None:
        """Sample the master's stats on its own port and feed the worker watch."""
        refused = 0
        while True:
            try:
                reply = await self._ask_master(
                    sup.master.port, credentials, timeout=sup.settings.stats_interval * 2
                )
                refused = 0
                sup.master_gone = False
            except ConnectionRefusedError as exc:
                refused += 1
                reply = None
                if refused == 3 and not sup.master_gone:
                    sup.master_gone = True
                    emit(
                        MasterUnreachable(
                            at=self.clock.wall(),
                            source=sup.watch.source,
                            port=sup.master.port,
                            error=str(exc),
                        )
                    )
            except (OSError, WQSupervisorError):
                reply = None
            if reply:
                self._observe(sup, MasterStats.from_any(reply[0]), emit)
            await self._until_next_sample(sup)

    async def _until_next_sample(self, sup: Supervised) -> None:
        """The sampling interval, cut short when the handle says tasks were submitted."""
        sup.sample_now.clear()
        waits: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(self.clock.sleep(_sample_interval(sup.settings))),
            asyncio.ensure_future(sup.sample_now.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def _observe(self, sup: Supervised, stats: MasterStats, emit: Callable[[Event], None]) -> None:
        backlog_grew = sup.stats is None or stats.tasks_waiting > sup.stats.tasks_waiting
        if backlog_grew and isinstance(sup.jobs, JobTracker):
            sup.jobs.nudge()  # decide now, not at the next poll
        sup.stats = stats
        sup.stats_at = self.clock.monotonic()
        for event in sup.watch.observe(stats, self.clock.monotonic(), self.clock.wall()):
            emit(event)

    def snapshot(self) -> SupervisorSnapshot:
        """Everything the status command shows (secrets included: redact before showing)."""
        return SupervisorSnapshot(
            version=__version__,
            pid=os.getpid(),
            started=self.started,
            masters=tuple(sup.snapshot(self.clock) for sup in self.masters.values()),
            finished=tuple(self.finished[-10:]),
            events=tuple(self.recent)[-20:],
        )

    # -- the control protocol ------------------------------------------------------

    async def serve_unix(self, path: str, *, control: bool = True) -> None:
        """Accept connections on a unix socket only this user can open.

        ``control``: handles that attach masters and follow their events (the
        ``run`` command's socket). Otherwise readers, as ``status`` is: they may
        ask for a snapshot and nothing else, and get no events.
        """
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(
                functools.partial(self._client, control=control), path, limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._servers.append((server, path))

    async def serve_status(self) -> str:
        """Answer ``python -m wqsupervisor status`` on this process's socket in the status directory."""
        from .status import new_socket_path

        path = str(new_socket_path())
        await self.serve_unix(path, control=False)
        return path

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one handle until it hangs up (the agent's only connection)."""
        await self._client(reader, writer)

    async def _client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, control: bool = True
    ) -> None:
        owner = object()
        out: asyncio.Queue[Reply | EventMessage | None] = asyncio.Queue()

        def sink(event: Event, state: str) -> None:
            out.put_nowait(EventMessage(event, TunnelState(state)))

        remove = self.add_sink(sink) if control else (lambda: None)
        sender = asyncio.create_task(_send_lines(writer, out))
        me = asyncio.current_task()
        if me is not None:
            self._clients[me] = writer
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than any request: answer once, then hang up
                    out.put_nowait(
                        ErrorReply(f"request longer than {MAX_REQUEST} bytes", "send one request per line")
                    )
                    break
                if not line:
                    break
                out.put_nowait(await self._handle(line, owner, control))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            try:
                for sup_id in [k for k, s in self.masters.items() if s.owner is owner]:
                    await self.detach(sup_id)
            finally:
                remove()
                out.put_nowait(None)
                try:
                    with contextlib.suppress(Exception):
                        await sender
                finally:
                    sender.cancel()  # only when this task itself was cancelled meanwhile
                    writer.close()
                    if me is not None:
                        self._clients.pop(me, None)

    def _owned(self, sup_id: str, owner: object) -> Supervised:
        """The master attached as ``sup_id`` by this connection (KeyError when none is)."""
        sup = self.masters[sup_id]
        if sup.owner is not owner:
            raise WQSupervisorError(
                f"no master {sup_id!r} was attached on this connection",
                "a supervisor is controlled by the handle that attached its master",
            )
        return sup

    async def _handle(self, line: bytes, owner: object, control: bool) -> Reply:
        try:
            request = decode_request(line)
            if not control and not isinstance(request, (GetSnapshot, Ping)):
                return ErrorReply(
                    f"this socket only answers snapshot requests, not {request.op!r}",
                    "a supervisor is controlled by the handle that attached its master",
                )
            if isinstance(request, Attach):
                sup = self.attach(request.master, request.settings, owner)
                return Attached(id=sup.id, remote_port=sup.tunnel.remote_port)
            if isinstance(request, Detach):
                if request.id in self.masters:  # detaching what is not attached is a no-op
                    await self.detach(self._owned(request.id, owner).id)
                return Ack(request.op)
            if isinstance(request, GetSnapshot):
                return SnapshotReply(self.snapshot())
            if isinstance(request, ReportStats):
                sup = self._owned(request.id, owner)
                self._observe(sup, request.stats, self._emit_for(sup.id))
                return Ack(request.op)
            if isinstance(request, Submitted):
                self._owned(request.id, owner).sample_now.set()
                return Ack(request.op)
            if isinstance(request, Adapt):
                sup = self._owned(request.id, owner)
                if sup.jobs is None:
                    return ErrorReply(
                        "this supervisor starts no workers",
                        "pass workers='slurm' (or another system) when attaching",
                    )
                sup.jobs.adapt(request.minimum, request.maximum)
                return Ack(request.op)
            assert isinstance(request, Ping)
            return Ack(request.op)
        except WQSupervisorError as exc:
            return ErrorReply.of(exc)
        except (KeyError, TypeError, ValueError) as exc:
            return ErrorReply(f"bad request: {exc}")


async def _send_lines(writer: asyncio.StreamWriter, out: asyncio.Queue[Reply | EventMessage | None]) -> None:
    while (item := await out.get()) is not None:
        writer.write(encode(item))
        try:
            await writer.drain()
        except ConnectionError:
            return

"""The engine: supervision that never waits on the application.

``q.wait()`` of the ndcctools bindings holds the GIL for its whole duration,
so nothing that must react in time can live in the application's process.
The engine runs in its own process (the agent, for the drop-in wrapper) or in
the ``python -m wqsupervisor run`` parent, on one asyncio loop. For every
attached master it runs a :class:`~wqsupervisor.tunnel.Tunnel` and a stats
sampler that asks the master's own port for ``queue_status``.

Handles talk to it over a unix socket, one JSON object per line::

    -> {"op": "attach", "master": {...}, "settings": {...}}
    <- {"reply": "attach", "id": "m1"}
    <- {"type": "event", "data": {...}, "state": "up"}
    -> {"op": "snapshot"}      <- {"reply": "snapshot", "data": {...}}
    -> {"op": "detach", "id": "m1"}
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__
from .backends import tunnel_for
from .clock import Clock, SystemClock
from .config import Settings
from .errors import WQSupervisorError
from .events import Event, JobSubmitFailed, MasterUnreachable, TunnelDown, event_from_dict
from .jobs import FactoryTracker, JobTracker, build_tracker
from .lifecycle import TunnelState
from .logs import redact
from .master import MasterInfo, MasterStats
from .passwords import read_password
from .tunnel import Tunnel
from .watch import WorkerWatch
from .wqproto import Credentials, request_status, tls_context

_RECENT_EVENTS = 50


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

    def snapshot(self, clock: Clock) -> dict[str, Any]:
        st = self.stats or MasterStats()
        return {
            "id": self.id,
            "master": {
                "port": self.master.port,
                "name": self.master.name,
                "pid": self.master.pid,
                "reply_timeout": self.master.reply_timeout,
            },
            "tunnel": self.tunnel.snapshot(),
            "workers": {
                "connected": st.workers_connected,
                "idle": st.workers_idle,
                "busy": st.workers_busy,
                "peak": self.watch.peak,
            },
            "tasks": {
                "waiting": st.tasks_waiting,
                "running": st.tasks_running,
                "on_workers": st.tasks_on_workers,
                "done": st.tasks_done,
                "submitted": st.tasks_submitted,
            },
            "stats_age": round(clock.monotonic() - self.stats_at, 2) if self.stats_at else None,
            **({"jobs": self.jobs.snapshot()} if self.jobs is not None else {}),
        }


class Engine:
    """Supervises attached masters; emits events to every connected handle."""

    def __init__(self, *, clock: Clock | None = None, rundir: str | None = None) -> None:
        self.clock = clock or SystemClock()
        self._own_rundir = rundir is None
        self.rundir = rundir or tempfile.mkdtemp(prefix="wqs-")
        os.chmod(self.rundir, 0o700)
        self._ids = itertools.count(1)
        self.masters: dict[str, Supervised] = {}
        self.finished: list[dict[str, Any]] = []
        self.recent: deque[dict[str, Any]] = deque(maxlen=_RECENT_EVENTS)
        self._sinks: list[Callable[[Event, str], None]] = []
        self._servers: list[tuple[asyncio.AbstractServer, str]] = []
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
            if sup is not None and isinstance(event, TunnelDown):
                sup.watch.note_tunnel_down(self.clock.monotonic())
            state = sup.tunnel.state.value if sup is not None else "closed"
            self.recent.append(redact(event.to_dict()))
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
        credentials = Credentials(
            password=read_password(settings.password_file) if settings.password_file else None,
            tls=tls_context() if settings.ssl else None,
        )

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
        if self._own_rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)
        self.closed.set()

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
            await self.clock.sleep(sup.settings.stats_interval)

    def _observe(self, sup: Supervised, stats: MasterStats, emit: Callable[[Event], None]) -> None:
        backlog_grew = sup.stats is None or stats.tasks_waiting > sup.stats.tasks_waiting
        if backlog_grew and isinstance(sup.jobs, JobTracker):
            sup.jobs.nudge()  # decide now, not at the next poll
        sup.stats = stats
        sup.stats_at = self.clock.monotonic()
        for event in sup.watch.observe(stats, self.clock.monotonic(), self.clock.wall()):
            emit(event)

    def snapshot(self) -> dict[str, Any]:
        """Everything the status command shows."""
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "masters": [sup.snapshot(self.clock) for sup in self.masters.values()],
            "finished": self.finished[-10:],
            "events": list(self.recent)[-20:],
        }

    # -- the control protocol ------------------------------------------------------

    async def serve_unix(self, path: str) -> None:
        """Accept handles on a unix socket only this user can open."""
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._client, path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._servers.append((server, path))

    async def serve_status(self) -> str:
        """Answer ``python -m wqsupervisor status`` on this process's socket in the status directory."""
        from .status import new_socket_path

        path = str(new_socket_path())
        await self.serve_unix(path)
        return path

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one handle until it hangs up (the agent's only connection)."""
        await self._client(reader, writer)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        owner = object()
        out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def sink(event: Event, state: str) -> None:
            out.put_nowait({"type": "event", "data": redact(event.to_dict()), "state": state})

        remove = self.add_sink(sink)
        sender = asyncio.create_task(_send_lines(writer, out))
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                except ValueError:
                    out.put_nowait({"reply": "error", "error": "not JSON"})
                    continue
                out.put_nowait(await self._handle(request, owner))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for sup_id in [k for k, s in self.masters.items() if s.owner is owner]:
                await self.detach(sup_id)
            remove()
            out.put_nowait(None)
            with contextlib.suppress(Exception):
                await sender
            writer.close()

    async def _handle(self, request: dict[str, Any], owner: object) -> dict[str, Any]:
        op = request.get("op")
        try:
            if op == "attach":
                from .config import settings_from_kwargs

                settings = settings_from_kwargs(request.get("settings", {}))
                sup = self.attach(MasterInfo.from_dict(request["master"]), settings, owner)
                return {"reply": "attach", "id": sup.id, "remote_port": sup.tunnel.remote_port}
            if op == "detach":
                await self.detach(str(request.get("id")))
                return {"reply": "detach"}
            if op == "snapshot":
                return {"reply": "snapshot", "data": self.snapshot()}
            if op == "stats":
                sup = self.masters[str(request["id"])]
                self._observe(sup, MasterStats.from_any(request["stats"]), self._emit_for(sup.id))
                return {"reply": "stats"}
            if op == "adapt":
                sup = self.masters[str(request["id"])]
                if sup.jobs is None:
                    return {
                        "reply": "error",
                        "error": "this supervisor starts no workers",
                        "hint": "pass workers='slurm' (or another system) when attaching",
                    }
                sup.jobs.adapt(request.get("minimum"), request.get("maximum"))
                return {"reply": "adapt"}
            if op == "ping":
                return {"reply": "ping"}
        except WQSupervisorError as exc:
            return {"reply": "error", "error": exc.message, "hint": exc.hint}
        except (KeyError, TypeError, ValueError) as exc:
            return {"reply": "error", "error": f"bad request: {exc}"}
        return {"reply": "error", "error": f"unknown op {op!r}"}


async def _send_lines(writer: asyncio.StreamWriter, out: asyncio.Queue[dict[str, Any] | None]) -> None:
    while (item := await out.get()) is not None:
        writer.write(json.dumps(item).encode() + b"\n")
        try:
            await writer.drain()
        except ConnectionError:
            return


def decode_event(message: dict[str, Any]) -> tuple[Event, TunnelState] | None:
    """Read an event line sent by :meth:`Engine._client`."""
    if message.get("type") != "event":
        return None
    try:
        return event_from_dict(message["data"]), TunnelState(message.get("state", "new"))
    except (KeyError, ValueError, TypeError):
        return None

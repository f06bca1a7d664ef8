"""The drop-in wrapper: attach a supervisor to a running master in one line.

::

    q = WorkQueue(port=9123)
    with supervise(q, via="alice@login.cluster.edu", remote_port=10001):
        ...  # the script's own submit / wait loop, unchanged

The :class:`Supervisor` is a handle. The supervision itself runs in an engine
outside this process (see :mod:`wqsupervisor.engine`), because the master's
``wait()`` may hold the GIL for a minute; the handle only tells the engine
which master to watch and relays its events to your callbacks and logs.
Nothing of the master is wrapped or patched: its methods return what they
always did.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sized
from pathlib import Path
from typing import Any

from . import passwords
from . import rundir as rundirs
from .config import Settings, settings_from_kwargs
from .errors import WQSupervisorError
from .events import Event, EventBus, TunnelFailed
from .lifecycle import TunnelState
from .master import MasterInfo, describe, read_stats, set_reply_timeout, task_table
from .process import terminate
from .protocol import EngineClient, SupervisorSnapshot

ENGINE_ENV = "WQSUPERVISOR_ENGINE"
_REPLY_TIMEOUT = 15.0
# How often the handle looks at the binding's task table for new submissions.
_SUBMISSIONS_POLL = 0.05
_live: weakref.WeakSet[Supervisor] = weakref.WeakSet()


class Supervisor:
    """A supervised tunnel for one master. Close it (or leave the ``with``) to tear it down."""

    def __init__(
        self,
        master: Any,
        settings: Settings | None = None,
        *,
        on_event: Callable[[Event], None] | None = None,
        log_events: bool = True,
        engine: str | None = None,
        **options: Any,
    ) -> None:
        self.settings = (
            settings_from_kwargs(options, base=settings) if options or settings is None else settings
        )
        self.settings.require_tunnel()
        self.info: MasterInfo = describe(master)
        read_stats(master)  # fail now, in the caller's thread, if the contract is not met
        if getattr(master, "_using_ssl", False) and not self.settings.ssl:
            self.settings = self.settings.replace(ssl=True)  # ndcctools master with ssl=(key, cert)
        auto_password = self.settings.password_file == passwords.AUTO
        self.settings = passwords.prepare(self.settings, master)
        # A password file made for this supervisor alone goes with it.
        self._own_password = self.settings.password_file if auto_password else None
        self.info = MasterInfo(
            port=self.info.port,
            name=self.info.name,
            password_file=self.settings.password_file,
            pid=os.getpid(),
            reply_timeout=set_reply_timeout(master, self.settings.master_timeout),
            kind=self.info.kind,
        )
        try:
            self._master: Callable[[], Any] = weakref.ref(master)
        except TypeError:
            self._master = lambda: None
        self.bus = EventBus(log=log_events)
        if on_event is not None:
            self.bus.subscribe(on_event)
        self._state = TunnelState.NEW
        self._up = threading.Event()
        self._settled = threading.Event()
        self._closed = False
        self._agent: subprocess.Popen[bytes] | None = None
        self._rundir: str | None = None
        self.failure: str | None = None
        self.events: list[Event] = []
        self._client = EngineClient(
            self._connect(engine or os.environ.get(ENGINE_ENV)),
            on_event=self._on_event,
            on_close=self._engine_lost,
            reply_timeout=_REPLY_TIMEOUT,
        )
        attached = self._client.attach(self.info, self.settings)
        self.id: str = attached.id
        self.remote_port: int = int(attached.remote_port or self.settings.remote_port or 0)
        self._watching = threading.Event()
        table = task_table(master)
        if table is not None:
            threading.Thread(
                target=self._watch_submissions, args=(table,), name="wqsupervisor-submissions", daemon=True
            ).start()
        _live.add(self)

    # -- connection to the engine ------------------------------------------------------

    def _connect(self, engine_path: str | None) -> socket.socket:
        if engine_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(engine_path)
            except OSError as exc:
                sock.close()
                raise WQSupervisorError(
                    f"cannot reach the supervisor engine at {engine_path}: {exc.strerror}",
                    f"unset {ENGINE_ENV} or start the script with 'python -m wqsupervisor run'",
                ) from None
            return sock
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._rundir = rundirs.create()
        try:
            self._agent = subprocess.Popen(
                [sys.executable, "-m", "wqsupervisor.agent", str(theirs.fileno()), self._rundir],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        finally:
            theirs.close()
        return mine

    def _watch_submissions(self, table: Sized) -> None:
        """Tell the engine as soon as the script submits tasks, so that workers are asked for at once.

        Reads only the length of the binding's task table (see
        :func:`~wqsupervisor.master.task_table`); the master itself is not
        touched from this thread.
        """
        seen = len(table)
        while not self._watching.wait(_SUBMISSIONS_POLL):
            now = len(table)
            if now > seen:
                try:
                    self._client.submitted(self.id, now)
                except WQSupervisorError:
                    return  # the engine is gone; _engine_lost says so
            seen = now

    def _on_event(self, event: Event, state: TunnelState) -> None:
        """Follow the tunnel's state and relay the event (on the client's reader thread)."""
        self._state = state
        self.events.append(event)
        if state is TunnelState.UP:
            self._up.set()
        else:
            self._up.clear()
        if isinstance(event, TunnelFailed):
            self.failure = f"{event.error}; {event.hint}" if event.hint else event.error
        if state in (TunnelState.UP, TunnelState.FAILED, TunnelState.CLOSED):
            self._settled.set()
        self.bus.emit(event)

    def _engine_lost(self) -> None:
        """The engine hung up (on the client's reader thread): unless we closed, the tunnel is gone."""
        if not self._closed:
            self._up.clear()
            self._state = TunnelState.FAILED
            error = f"{self._what_ended()}; the tunnel is gone and workers cannot reach the master"
            hint = "see the agent's log lines above; supervise the master again to restore the tunnel"
            self.failure = f"{error}; {hint}"
            event = TunnelFailed(at=time.time(), source=self._label(), error=error, hint=hint)
            self.events.append(event)
            self.bus.emit(event)
        self._settled.set()

    def _what_ended(self) -> str:
        """Who ended the engine's connection, and how; reaps our agent."""
        agent = self._agent
        if agent is None:
            return "the supervisor engine closed its connection"
        try:
            code = agent.wait(5)
        except subprocess.TimeoutExpired:
            return f"the supervisor's agent (pid {agent.pid}) stopped answering"
        if self._rundir is not None:
            rundirs.remove(self._rundir)  # the agent cannot any more
        if code < 0:
            return f"the supervisor's agent (pid {agent.pid}) was killed by {signal.Signals(-code).name}"
        return f"the supervisor's agent (pid {agent.pid}) exited with status {code}"

    def _label(self) -> str:
        return f"{self.settings.via}:{getattr(self, 'remote_port', self.settings.remote_port)}"

    # -- what a user asks -------------------------------------------------------------

    @property
    def state(self) -> TunnelState:
        """The tunnel's state as last reported by the engine."""
        return self._state

    def subscribe(self, listener: Callable[[Event], None], kind: type[Event] = Event) -> Callable[[], None]:
        """Call ``listener`` for each event of type ``kind``; returns the unsubscriber.

        Listeners run on a background thread of this process, so while the
        master's ``wait()`` holds the GIL they run late (the engine does not).
        """
        return self.bus.subscribe(listener, kind)

    def wait_until_up(self, timeout: float | None = None) -> bool:
        """Block until the tunnel is verified up; False on timeout. Raises if it failed for good."""
        deadline = None if timeout is None else _now() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - _now())
            if self._up.wait(remaining if remaining is None else min(remaining, 0.1)):
                return True
            if self._state is TunnelState.FAILED:
                raise WQSupervisorError(self.failure or "the tunnel failed")
            if self._state is TunnelState.CLOSED:
                return False
            if deadline is not None and _now() >= deadline:
                return False

    def adapt(self, minimum: int | None = None, maximum: int | None = None) -> None:
        """Change how many workers the supervisor keeps (``workers=`` must be set)."""
        self._client.adapt(self.id, minimum, maximum)

    def snapshot(self) -> SupervisorSnapshot:
        """The engine's view: tunnel, workers, tasks, recent events."""
        return self._client.snapshot()

    def close(self, timeout: float = 10.0) -> None:
        """Close the tunnel and reap every child. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._watching.set()
        _live.discard(self)
        master = self._master()
        if master is not None:
            # The last word on the counters, read in the thread that closes
            # (the one driving the master), for the summary.
            with contextlib.suppress(Exception):
                self._client.report_stats(self.id, read_stats(master))
        with contextlib.suppress(WQSupervisorError):
            self._client.detach(self.id)
        self._client.close(timeout)
        if self._agent is not None:
            try:
                self._agent.wait(timeout)
            except subprocess.TimeoutExpired:
                terminate(self._agent, grace=2)
        if self._rundir is not None:
            rundirs.remove(self._rundir)
        if self._own_password is not None:
            Path(self._own_password).unlink(missing_ok=True)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Supervisor {self.settings.via}:{self.remote_port} -> :{self.info.port} {self._state.name}>"


def supervise(master: Any, settings: Settings | None = None, **options: Any) -> Supervisor:
    """Attach a supervisor to ``master``; see :class:`Supervisor` and :class:`Settings`."""
    return Supervisor(master, settings, **options)


def _now() -> float:
    return time.monotonic()


@atexit.register
def _close_all() -> None:
    for sup in list(_live):
        with contextlib.suppress(Exception):
            sup.close(timeout=5)

"""``python -m wqsupervisor run app.py``: supervise an unmodified master script.

The script runs in a child process started through :mod:`wqsupervisor._bootstrap`,
which attaches a supervisor to every ``WorkQueue`` it creates. This process
hosts the engine on a thread of its own and stays responsive whatever the
script does: a master in ``wait(60)`` holds its GIL and may ignore SIGINT,
but the tunnel is still watched, and Ctrl-C or SIGTERM still ends the run in
order (the script first, with a grace period, then the tunnels, then a
one-line summary).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ._bootstrap import BOOTSTRAP, SETTINGS_ENV, follow_directory
from .children import listening_descendants
from .config import Settings
from .engine import Engine
from .errors import ConfigError
from .events import Event, TunnelFailed, TunnelUp, log_event
from .lifecycle import TunnelState
from .passwords import AUTO, prepare, private_dir
from .process import exit_status, owned_argv, terminate
from .protocol import SupervisorSnapshot
from .status import status_dir
from .supervisor import ENGINE_ENV

T = TypeVar("T")


class EngineThread:
    """An :class:`Engine` on an event loop in a background thread, serving a unix socket."""

    def __init__(self, *, log: bool = True) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="wqsupervisor-engine", daemon=True
        )
        self._thread.start()
        try:
            self.engine: Engine = self.call(self._make())
        except BaseException:
            self._end_loop()
            raise
        try:
            self.socket_path = os.path.join(self.engine.rundir, "engine.sock")
            self.call(self.engine.serve_unix(self.socket_path))
            self.status_path: str = self.call(self.engine.serve_status())
        except BaseException:
            self.stop()
            raise
        if log:
            self.engine.add_sink(lambda event, _state: log_event(event))

    @staticmethod
    async def _make() -> Engine:
        return Engine()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        """Run ``coro`` on the engine's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def add_sink(self, sink: Any) -> None:
        """Forward every event to ``sink(event, state)`` (called on the engine thread)."""
        self._loop.call_soon_threadsafe(self.engine.add_sink, sink)

    def snapshot(self) -> SupervisorSnapshot:
        """The engine's snapshot, taken on its own thread."""

        async def take() -> SupervisorSnapshot:
            return self.engine.snapshot()

        return self.call(take())

    def stop(self) -> None:
        """Close every tunnel, stop the loop, join the thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self.call(self.engine.close(), timeout=30)
        with contextlib.suppress(Exception):
            self.call(_finish_tasks(), timeout=15)
        self._end_loop()

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


async def _finish_tasks() -> None:
    """Cancel what still runs on this loop and let it unwind (its connections close), as asyncio.run does."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    await asyncio.get_running_loop().shutdown_asyncgens()


class _Signals:
    """What the parent does on SIGINT/SIGTERM while the script runs."""

    def __init__(self, child: subprocess.Popen[bytes], grace: float) -> None:
        self.child = child
        self.grace = grace
        self.received: int | None = None
        self._timer: threading.Timer | None = None

    def __call__(self, signum: int, _frame: object) -> None:
        first = self.received is None
        self.received = self.received or signum
        if signum == signal.SIGTERM or not first:
            self._send(signal.SIGTERM)
        elif first:
            # A terminal's Ctrl-C reaches the script too; a kill -INT aimed at
            # us does not, so pass it on if the script is still there shortly.
            self._later(2.0, signal.SIGINT)
        if first:
            self._later(self.grace, signal.SIGTERM)
            self._later(self.grace + 5.0, signal.SIGKILL)

    def _send(self, sig: int) -> None:
        if self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(sig)

    def _later(self, delay: float, sig: int) -> None:
        timer = threading.Timer(delay, self._send, (sig,))
        timer.daemon = True
        timer.start()


def run_script(
    settings: Settings, script: str, args: list[str], *, grace: float = 10.0, view: bool = True
) -> int:
    """Run ``script`` supervised; returns the exit status to leave with.

    With ``view`` and a terminal on stdout, a live view replaces the log lines
    and the script's own output is printed above it.
    """
    path = Path(script)
    if not path.is_file():
        raise ConfigError(f"no such script: {script}", "give the path of a Python master script")
    settings.require_tunnel()
    # Everything that can be wrong with the settings or the machine is said now,
    # before the engine, the metrics or the script start.
    if settings.password_file == AUTO:
        private_dir()
    elif settings.password_file is not None or not settings.allow_no_password:
        prepare(settings, None)  # creates a missing file; raises the explanation
    status_dir()
    started = time.monotonic()
    from .view import should_use_live_view

    use_live = view and should_use_live_view(sys.stdout)
    host = EngineThread(log=not use_live)
    live = None
    metrics = None
    child: subprocess.Popen[bytes] | None = None
    try:
        if use_live:
            from .view import LiveView

            live = LiveView(host.snapshot)
        watch = StartWatch()
        host.add_sink(watch)
        if settings.metrics_port is not None:
            from .metrics import MetricsServer

            metrics = MetricsServer(host.snapshot, host=settings.metrics_host, port=settings.metrics_port)
            metrics.start()
        env = dict(os.environ)
        env[ENGINE_ENV] = host.socket_path
        env[SETTINGS_ENV] = json.dumps(settings.to_dict())
        package_root = str(Path(__file__).resolve().parent.parent)
        follow = follow_directory(str(Path(host.socket_path).parent))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (follow, package_root, env.get("PYTHONPATH")) if p)
        # The script dies with this process, SIGKILL included, as if `run` had exec'd it. Not
        # `-m wqsupervisor._bootstrap`: that runs a second copy of the module as __main__ beside
        # the one the children's sitecustomize imports here too, and two import hooks then
        # called each other without end on the script's first `import work_queue`.
        argv = owned_argv([sys.executable, "-c", BOOTSTRAP, str(path), *args], "KILL")
        if live is None:
            child = subprocess.Popen(argv, env=env)
        else:
            child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            live.start()
            threading.Thread(
                target=_relay, args=(child, live), name="wqsupervisor-output", daemon=True
            ).start()
    except BaseException:
        # Nothing outlives a start that failed: the script, the engine's run directory and sockets.
        if child is not None:
            terminate(child)
        if metrics is not None:
            metrics.stop()
        if live is not None:
            live.stop()
        host.stop()
        raise
    handler = _Signals(child, grace)
    watch.on_fatal = lambda: handler(signal.SIGTERM, None)
    threading.Thread(
        target=_say_foreign_masters, args=(child, host), name="wqsupervisor-children", daemon=True
    ).start()
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:
                continue
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if live is not None:
            live.stop()
        if metrics is not None:
            metrics.stop()
        snapshot = host.snapshot()
        host.stop()
    status = exit_status(code)
    signum = handler.received
    if watch.say_fatal():
        status, signum = 2, None
    print(summary_line(path.name, status, time.monotonic() - started, snapshot, signum), file=sys.stderr)
    return status


# How long a run may go without a supervised master before it says what its children listen on.
FOREIGN_AFTER = 10.0


def _say_foreign_masters(child: subprocess.Popen[bytes], host: EngineThread) -> None:
    """No master supervised after a while, but processes of the script listen: name them, and attach."""
    started = time.monotonic()
    while child.poll() is None:
        time.sleep(2.0)
        try:
            snap = host.snapshot()
        except Exception:  # the engine is going away with the run
            return
        if snap.masters or snap.finished:
            return
        if time.monotonic() - started < FOREIGN_AFTER:
            continue
        found = listening_descendants(child.pid)
        if found:
            ports = ", ".join(f"{f.command} (pid {f.pid}) on port {f.port}" for f in found)
            print(
                "wqsupervisor: no master in the script's Python processes yet, but processes it started "
                f"listen: {ports}. A master that is not in a Python process of the script is not "
                f"wrapped by 'run'; supervise it with: python -m wqsupervisor attach --master-port "
                f"{found[0].port} [the same options]",
                file=sys.stderr,
            )
            return


def _relay(child: subprocess.Popen[bytes], live: Any) -> None:
    """The script's output, printed above the live view instead of across it."""
    assert child.stdout is not None
    for raw in child.stdout:
        live.console.print(raw.decode(errors="replace").rstrip("\n"), markup=False, highlight=False)


class StartWatch:
    """Ends the run when a tunnel fails before it was ever up.

    Nothing can have been lost yet, and a master left waiting for workers that
    cannot reach it helps nobody. A tunnel that fails after it has been up is
    reported, and the script keeps its master and whatever local work it has.
    """

    def __init__(self) -> None:
        self._up: set[str] = set()
        self.fatal: TunnelFailed | None = None
        self.on_fatal: Callable[[], None] = lambda: None

    def __call__(self, event: Event, _state: str) -> None:
        if isinstance(event, TunnelUp):
            self._up.add(event.source)
        elif isinstance(event, TunnelFailed) and event.source not in self._up and self.fatal is None:
            self.fatal = event
            self.on_fatal()

    def say_fatal(self) -> bool:
        """Print the failure that ended the run, with its hint, on stderr; False when there was none."""
        if self.fatal is None:
            return False
        hint = f"; hint: {self.fatal.hint}" if self.fatal.hint else ""
        print(f"wqsupervisor: error: {self.fatal.error}{hint}", file=sys.stderr)
        return True


def summary_line(
    name: str, status: int, elapsed: float, snapshot: SupervisorSnapshot, signum: int | None = None
) -> str:
    """One line that says how the run went."""
    how = f"exited with status {status}"
    if signum is not None:
        how += f" after {signal.Signals(signum).name}"
    parts = [f"wqsupervisor: {name} {how} after {elapsed:.1f} s"]
    for entry in (*snapshot.finished, *snapshot.masters):
        tunnel = entry.tunnel
        # A tunnel that failed and was then closed is still a failure.
        state = "failed" if tunnel.failed else tunnel.state.value
        error = tunnel.failed or (tunnel.last_error if tunnel.state is TunnelState.FAILED else None)
        text = f"tunnel {tunnel.via}:{tunnel.remote_port} {state}, {tunnel.restarts} restart(s)"
        if tunnel.recoveries:
            text += f" (worst recovery {max(tunnel.recoveries):.2f} s)"
        if error:
            text += f", error: {error}"
        # The counts are the master's last status answer: under attach, or with a master in a
        # child process, one taken before its last results (the handle's own last read is exact).
        tasks = entry.tasks
        done = f"{tasks.done}/{tasks.submitted}" if tasks.submitted else str(tasks.done)
        text += f", workers peak {entry.workers.peak}, tasks done {done} at the master's last status"
        parts.append(text)
    if len(parts) == 1:
        parts.append("no master was created")
    return "; ".join(parts)

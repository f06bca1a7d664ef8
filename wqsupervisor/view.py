"""A live console view of the engine's snapshot, for ``python -m wqsupervisor run`` on a terminal.

:func:`render` turns one :class:`~wqsupervisor.protocol.SupervisorSnapshot`
into a rich renderable and is pure; :class:`LiveView` redraws it from a
snapshot function in a background thread. Everything shown passes through
:meth:`~wqsupervisor.protocol.SupervisorSnapshot.redacted` first. It needs the ``view`` extra
(``pip install 'wqsupervisor[view]'``); without rich,
:func:`should_use_live_view` says no and the run logs as before::

    host = EngineThread(log=not should_use_live_view(sys.stdout))
    view = LiveView(host.snapshot) if should_use_live_view(sys.stdout) else None
    if view is not None:
        view.start()
    try:
        ...  # run the script
    finally:
        if view is not None:
            view.stop()  # leaves the last frame on screen
        host.stop()
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConfigError
from .events import Event
from .lifecycle import TunnelState
from .logs import redact_text
from .protocol import JOB_STATES, MasterSnapshot, SupervisorSnapshot

try:
    from rich.console import Console, Group, RenderableType
    from rich.live import Live
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text
except ImportError:  # pragma: no cover - the "view" extra is not installed
    _HAVE_RICH = False
else:
    _HAVE_RICH = True

__all__ = ["LiveView", "render", "should_use_live_view"]

_EVENTS_SHOWN = 8
_BAR_WIDTH = 30
_STATE_STYLES = {
    TunnelState.NEW: "dim",
    TunnelState.CONNECTING: "yellow",
    TunnelState.UP: "bold green",
    TunnelState.STALLED: "bold yellow",
    TunnelState.DOWN: "bold red",
    TunnelState.FAILED: "bold white on red",
    TunnelState.CLOSED: "dim",
}
_LEVEL_STYLES = {"warning": "yellow", "error": "bold red"}
# Fields every event has; the rest are its details.
_EVENT_BASE = frozenset({"event", "at", "source"})


def should_use_live_view(stream: Any) -> bool:
    """True when ``stream`` is a terminal that can redraw (TERM is not "dumb") and rich is installed."""
    if not _HAVE_RICH or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    if isatty is None:
        return False
    try:
        return bool(isatty())
    except (OSError, ValueError):  # a closed or detached stream
        return False


def _require_rich() -> None:
    if not _HAVE_RICH:
        raise ConfigError("the live view needs rich", "pip install 'wqsupervisor[view]'")


def render(snapshot: SupervisorSnapshot, *, now: float | None = None) -> RenderableType:
    """The snapshot as a compact rich renderable: tunnels, workers, tasks, jobs and recent events.

    ``now`` (epoch seconds, default the current time) is what durations are measured to.
    """
    _require_rich()
    snap = snapshot.redacted()
    now = time.time() if now is None else now
    parts: list[RenderableType] = [_header(snap, now)]
    if not snap.masters:
        parts.append(Text("no master attached yet", style="dim"))
    parts.extend(_master_panel(entry, now) for entry in snap.masters)
    if snap.finished:
        parts.append(_finished(snap.finished))
    parts.append(_events(snap.events))
    return Group(*parts)


def _header(snap: SupervisorSnapshot, now: float) -> Text:
    text = Text.assemble(("wqsupervisor", "bold"), f" {snap.version}")
    if snap.pid is not None:
        text.append(f"  pid {snap.pid}")
    if snap.started is not None:
        text.append(f"  running {_duration(now - snap.started)}")
    text.append(f"  {_clock(now)}", style="dim")
    return text


def _master_panel(entry: MasterSnapshot, now: float) -> Panel:
    tunnel, master = entry.tunnel, entry.master
    style = _STATE_STYLES.get(tunnel.state, "")

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()

    line = Text(f"{tunnel.via}:{tunnel.remote_port} -> :{master.port}  ")
    line.append(tunnel.state.value.upper(), style=style)
    if tunnel.since is not None:
        line.append(f" for {_duration(now - tunnel.since)}")
    line.append(f"  restarts {tunnel.restarts}  stalls {tunnel.stalls}")
    line.append(f"  rtt {tunnel.rtt_ms:.1f} ms" if tunnel.rtt_ms is not None else "  rtt -")
    grid.add_row("tunnel", line)
    if tunnel.relay is not None:
        grid.add_row("relay", Text(tunnel.relay.describe()))
    elif tunnel.resume_off:
        grid.add_row("relay", Text(f"resumption off: {tunnel.resume_off}", style="yellow"))
    if tunnel.last_error:
        error_style = "red" if tunnel.state in (TunnelState.DOWN, TunnelState.FAILED) else "dim red"
        grid.add_row("error", Text(tunnel.last_error, style=error_style))

    workers = entry.workers
    wline = Text(
        f"connected {workers.connected}  idle {workers.idle}  busy {workers.busy}  peak {workers.peak}"
    )
    age = entry.stats_age
    wline.append("  (no stats yet)" if age is None else f"  (stats {age:.1f} s old)", style="dim")
    grid.add_row("workers", wline)

    tasks = entry.tasks
    done, submitted = tasks.done, tasks.submitted
    tline = Table.grid(padding=(0, 1))
    tline.add_row(
        Text(f"waiting {tasks.waiting}  running {tasks.running}  done {done}/{submitted}"),
        ProgressBar(total=max(submitted, 1), completed=min(done, max(submitted, 1)), width=_BAR_WIDTH),
        Text(f"{min(100, 100 * done // submitted)}%" if submitted else "-"),
    )
    grid.add_row("tasks", tline)

    jobs = entry.jobs
    if jobs is not None:
        # Only the states: the jobs snapshot also carries settings and paths.
        jline = Text(f"{jobs.system}: " if jobs.system else "")
        for name in JOB_STATES:
            count = jobs.count(name)
            jline.append(f"{name} {count}", style="red" if name == "failed" and count else "")
            jline.append("  ")
        grid.add_row("jobs", jline)

    title = Text(f"{entry.id} master :{master.port}")
    if master.name:
        title.append(f" {master.name}")
    return Panel(grid, title=title, title_align="left", border_style=style or "none", expand=True)


def _finished(finished: Sequence[MasterSnapshot]) -> Text:
    text = Text("finished:", style="bold")
    for item in finished[-3:]:
        tunnel, tasks = item.tunnel, item.tasks
        text.append(
            f"\n  {item.id} {tunnel.via}:{tunnel.remote_port}"
            f" {tunnel.state.value}, {tunnel.restarts} restart(s),"
            f" tasks done {tasks.done}/{tasks.submitted}"
        )
    return text


def _events(events: Sequence[Event]) -> Table:
    table = Table(title="recent events", title_justify="left", show_header=False, box=None, expand=True)
    table.add_column(style="dim", no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(overflow="ellipsis", no_wrap=True, ratio=1)
    shown = list(events)[-_EVENTS_SHOWN:]
    if not shown:
        table.add_row("", Text("none yet", style="dim"), "", "")
    for event in shown:
        details = " ".join(
            f"{key}={value}"
            for key, value in event.to_dict().items()
            if key not in _EVENT_BASE and value not in (None, "")
        )
        table.add_row(
            _clock(event.at),
            Text(event.name, style=_LEVEL_STYLES.get(event.level, "")),
            Text(event.source),
            Text(details),
        )
    return table


def _duration(seconds: float) -> str:
    """Seconds as a short human duration: 42s, 3m05s, 2h03m, 1d02h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _clock(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch).strftime("%H:%M:%S")


class LiveView:
    """Redraws :func:`render` of ``snapshot_fn()`` every ``refresh`` seconds on ``console``.

    The snapshot is taken on a background thread; if ``snapshot_fn`` raises, the
    view shows the error over the last good snapshot and keeps going. :meth:`stop`
    draws a last frame, joins the thread and leaves that frame on screen. Usable
    as a context manager.
    """

    def __init__(
        self,
        snapshot_fn: Callable[[], SupervisorSnapshot],
        console: Console | None = None,
        refresh: float = 0.5,
    ) -> None:
        _require_rich()
        if refresh <= 0:
            raise ValueError(f"refresh must be positive, not {refresh!r}")
        self._snapshot_fn = snapshot_fn
        self.console = console if console is not None else Console()
        self.refresh = refresh
        self._last: SupervisorSnapshot | None = None
        self._live: Live | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<LiveView {'running' if self.running else 'stopped'}>"

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._live is not None

    def start(self) -> None:
        """Draw the first frame and start redrawing in the background (no-op when running)."""
        with self._lock:
            if self._live is not None:
                return
            live = Live(self.frame(), console=self.console, auto_refresh=False)
            live.start(refresh=True)
            self._live = live
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="wqsupervisor-view", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Draw a last frame, stop the thread and give the terminal back (no-op when stopped)."""
        with self._lock:
            live, thread = self._live, self._thread
            if live is None:
                return
            self._stopping.set()
            if thread is not None:
                thread.join()
            self._live, self._thread = None, None
            try:
                live.update(self.frame(), refresh=True)
            except OSError:  # the terminal is gone; nothing left to draw on
                pass
            finally:
                live.stop()

    def __enter__(self) -> LiveView:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def frame(self) -> RenderableType:
        """One frame from a fresh snapshot; a failing ``snapshot_fn`` becomes part of the frame."""
        error: str | None = None
        try:
            self._last = self._snapshot_fn()
        except Exception as exc:
            error = redact_text(f"{type(exc).__name__}: {exc}")
        try:
            body = render(self._last) if self._last is not None else Text("waiting for a first snapshot")
        except Exception as exc:
            body = Text(redact_text(f"cannot show the snapshot: {type(exc).__name__}: {exc}"), style="red")
        if error is None:
            return body
        note = "showing the last good snapshot" if self._last is not None else "no snapshot yet"
        banner = Text.assemble(("snapshot failed: ", "bold red"), (error, "red"), f" ({note})")
        return Group(Panel(banner, border_style="red"), body)

    def _run(self) -> None:
        while not self._stopping.wait(self.refresh):
            live = self._live
            if live is None:
                return
            try:
                live.update(self.frame(), refresh=True)
            except Exception:  # noqa: S112 - a drawing glitch must never end the run it watches
                continue

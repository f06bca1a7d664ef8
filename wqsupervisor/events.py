"""Typed events, the bus that delivers them, and their stable log names.

Every event is a frozen dataclass with a class-level ``name`` (the structlog
event name, which never changes between releases) and plain fields, so it
crosses a process boundary as a JSON object and comes back as the same type.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .logs import get_logger, redact

E = TypeVar("E", bound="Event")


@dataclass(frozen=True)
class Event:
    """Base class: ``at`` is the wall time the event happened, ``source`` what it concerns."""

    name: ClassVar[str] = "event"
    level: ClassVar[str] = "info"
    at: float
    source: str

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-ready mapping with its name under ``event``."""
        data = dataclasses.asdict(self)
        data["event"] = self.name
        return data


_REGISTRY: dict[str, type[Event]] = {}


def _register(cls: type[E]) -> type[E]:
    _REGISTRY[cls.name] = cls
    return cls


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """Rebuild an event from :meth:`Event.to_dict` output (unknown fields are dropped)."""
    cls = _REGISTRY.get(str(data.get("event")))
    if cls is None:
        raise ValueError(f"unknown event {data.get('event')!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    # JSON has no tuples: give sequence fields their frozen form back.
    fields: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names
    }
    return cls(**fields)


def event_types() -> dict[str, type[Event]]:
    """Every event type by its stable name."""
    return dict(_REGISTRY)


# -- the tunnel ---------------------------------------------------------------


@_register
@dataclass(frozen=True)
class TunnelStarting(Event):
    """An ssh client was started for the tunnel."""

    name: ClassVar[str] = "tunnel.starting"
    attempt: int = 1
    pid: int | None = None


@_register
@dataclass(frozen=True)
class TunnelUp(Event):
    """The remote port was verified to reach this master."""

    name: ClassVar[str] = "tunnel.up"
    remote_port: int = 0
    verified_by: str = "status"
    took: float = 0.0
    restarts: int = 0


@_register
@dataclass(frozen=True)
class TunnelStalled(Event):
    """The session went silent: kept, not restarted, while the head is probed afresh."""

    name: ClassVar[str] = "tunnel.stalled"
    level: ClassVar[str] = "warning"
    silent_for: float = 0.0
    reason: str = ""


@_register
@dataclass(frozen=True)
class TunnelResumed(Event):
    """A stalled session answered again; no restart was needed."""

    name: ClassVar[str] = "tunnel.resumed"
    stalled_for: float = 0.0


@_register
@dataclass(frozen=True)
class TunnelDown(Event):
    """The tunnel stopped forwarding."""

    name: ClassVar[str] = "tunnel.down"
    level: ClassVar[str] = "warning"
    reason: str = ""
    exit_code: int | None = None
    up_for: float | None = None


@_register
@dataclass(frozen=True)
class TunnelRestarting(Event):
    """A restart is scheduled after ``delay`` seconds."""

    name: ClassVar[str] = "tunnel.restarting"
    delay: float = 0.0
    attempt: int = 1
    why: str = ""


@_register
@dataclass(frozen=True)
class TunnelMoved(Event):
    """The tunnel moved from head node ``left`` to head node ``to``, because ``why``."""

    name: ClassVar[str] = "tunnel.moved"
    left: str = ""
    to: str = ""
    why: str = ""


@_register
@dataclass(frozen=True)
class TunnelFailed(Event):
    """The tunnel gave up: ``error`` says what failed, ``hint`` what to do."""

    name: ClassVar[str] = "tunnel.failed"
    level: ClassVar[str] = "error"
    error: str = ""
    hint: str = ""


@_register
@dataclass(frozen=True)
class TunnelClosed(Event):
    """The tunnel was closed on purpose."""

    name: ClassVar[str] = "tunnel.closed"
    restarts: int = 0


@_register
@dataclass(frozen=True)
class StalePortReclaimed(Event):
    """A stale sshd session of ours held the remote port and was ended."""

    name: ClassVar[str] = "tunnel.port_reclaimed"
    level: ClassVar[str] = "warning"
    remote_port: int = 0
    pid: int = 0


@_register
@dataclass(frozen=True)
class RelayReattached(Event):
    """A new session took over the head relay: the workers' connections carried on."""

    name: ClassVar[str] = "tunnel.relay_reattached"
    took: float = 0.0
    connections: int = 0
    buffered: int = 0


@_register
@dataclass(frozen=True)
class RelayReleased(Event):
    """The head relay the tunnel left behind on ``head`` (it moved to another) was ended, ``after``
    seconds after the move: the workers it held connect again, through the head the tunnel is on."""

    name: ClassVar[str] = "tunnel.relay_released"
    head: str = ""
    after: float = 0.0


@_register
@dataclass(frozen=True)
class ResumptionOff(Event):
    """Resumable forwarding was asked for but the head node cannot run the relay; plain forwarding."""

    name: ClassVar[str] = "tunnel.resumption_off"
    level: ClassVar[str] = "warning"
    reason: str = ""


# -- the master and its workers -------------------------------------------------


@_register
@dataclass(frozen=True)
class WorkersJoined(Event):
    """``count`` workers connected since the last sample."""

    name: ClassVar[str] = "workers.joined"
    count: int = 0
    connected: int = 0


@_register
@dataclass(frozen=True)
class WorkersLost(Event):
    """``count`` workers disconnected since the last sample."""

    name: ClassVar[str] = "workers.lost"
    level: ClassVar[str] = "warning"
    count: int = 0
    connected: int = 0


@_register
@dataclass(frozen=True)
class WorkerCountChanged(Event):
    """The number of connected workers changed."""

    name: ClassVar[str] = "workers.count_changed"
    previous: int = 0
    connected: int = 0


@_register
@dataclass(frozen=True)
class AllWorkersLost(Event):
    """Every worker is gone; ``after_tunnel_drop`` when a tunnel drop came just before."""

    name: ClassVar[str] = "workers.all_lost"
    level: ClassVar[str] = "warning"
    previous: int = 0
    after_tunnel_drop: bool = False


@_register
@dataclass(frozen=True)
class MasterUnreachable(Event):
    """The master's own port stopped accepting connections (the master is gone)."""

    name: ClassVar[str] = "master.unreachable"
    level: ClassVar[str] = "error"
    port: int = 0
    error: str = ""


@_register
@dataclass(frozen=True)
class WorkerRejected(Event):
    """The master refused workers, typically for a protocol version mismatch."""

    name: ClassVar[str] = "workers.rejected"
    level: ClassVar[str] = "error"
    detail: str = ""


# -- worker jobs ------------------------------------------------------------------


@_register
@dataclass(frozen=True)
class JobsSubmitted(Event):
    """``count`` worker jobs were submitted to ``system``."""

    name: ClassVar[str] = "jobs.submitted"
    system: str = ""
    count: int = 0
    ids: tuple[str, ...] = ()
    why: str = ""


@_register
@dataclass(frozen=True)
class JobSubmitFailed(Event):
    """The scheduler refused a submission; ``error`` is its own text, ``retry_in`` the backoff."""

    name: ClassVar[str] = "jobs.submit_failed"
    level: ClassVar[str] = "error"
    system: str = ""
    error: str = ""
    hint: str = ""
    retry_in: float = 0.0


@_register
@dataclass(frozen=True)
class JobStateChanged(Event):
    """A worker job moved from ``previous`` to ``state``."""

    name: ClassVar[str] = "jobs.state"
    job: str = ""
    previous: str = ""
    state: str = ""


@_register
@dataclass(frozen=True)
class JobsCancelled(Event):
    """Worker jobs were cancelled: no longer needed, or the supervisor is closing."""

    name: ClassVar[str] = "jobs.cancelled"
    ids: tuple[str, ...] = ()
    why: str = ""


Listener = Callable[[Event], None]


@dataclass
class EventBus:
    """Delivers events to subscribers, in order, and logs each one under its name.

    A subscriber that raises is logged and kept; it never breaks delivery to the others.
    """

    log: bool = True
    _listeners: list[tuple[type[Event], Listener]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def subscribe(self, listener: Listener, kind: type[Event] = Event) -> Callable[[], None]:
        """Call ``listener`` for every event of type ``kind``; returns the unsubscriber."""
        entry = (kind, listener)
        with self._lock:
            self._listeners.append(entry)

        def unsubscribe() -> None:
            with self._lock:
                if entry in self._listeners:
                    self._listeners.remove(entry)

        return unsubscribe

    def emit(self, event: Event) -> None:
        """Log ``event`` and hand it to every matching subscriber."""
        if self.log:
            log_event(event)
        with self._lock:
            listeners = list(self._listeners)
        for kind, listener in listeners:
            if isinstance(event, kind):
                try:
                    listener(event)
                except Exception:
                    get_logger().exception("subscriber.failed", listener=repr(listener))


def log_event(event: Event) -> None:
    """Log ``event`` through structlog under its stable name."""
    fields = redact(event.to_dict())
    fields.pop("event", None)
    getattr(get_logger(), event.level)(event.name, **fields)

"""The engine's control protocol, in one place: messages, their encoding, the snapshot, one client.

Handles talk to an engine over a unix socket, one JSON object per line::

    -> {"op": "attach", "master": {...}, "settings": {...}}
    <- {"reply": "attach", "id": "m1", "remote_port": 10001}
    <- {"type": "event", "data": {...}, "state": "up"}
    -> {"op": "snapshot"}      <- {"reply": "snapshot", "data": {...}}
    -> {"op": "detach", "id": "m1"}

Requests are small frozen dataclasses (:class:`Attach`, :class:`Detach`,
:class:`GetSnapshot`, :class:`ReportStats`, :class:`Adapt`, :class:`Ping`),
replies likewise (:class:`Attached`, :class:`Ack`, :class:`SnapshotReply`,
:class:`ErrorReply`), and pushed events are :class:`EventMessage`. The status
snapshot is a tree of frozen dataclasses rooted at :class:`SupervisorSnapshot`;
the engine builds it, everyone else reads its attributes. JSON appears only
here: :func:`encode`, :func:`decode_request`, :func:`decode_message` and the
snapshots' ``to_dict``/``from_dict``. :class:`EngineClient` is the one client,
used by the drop-in :class:`~wqsupervisor.Supervisor` and by ``status``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import queue
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias, TypeVar

from .config import Settings, settings_from_kwargs
from .errors import ProtocolError, WQSupervisorError
from .events import Event, event_from_dict
from .lifecycle import TunnelState
from .logs import redact
from .master import MasterInfo, MasterStats

__all__ = [
    "JOB_STATES",
    "Ack",
    "Adapt",
    "Attach",
    "Attached",
    "Detach",
    "EngineClient",
    "ErrorReply",
    "EventMessage",
    "GetSnapshot",
    "JobsSnapshot",
    "MasterSnapshot",
    "MasterSummary",
    "Ping",
    "ReportStats",
    "SnapshotReply",
    "SupervisorSnapshot",
    "TasksSnapshot",
    "TcpSnapshot",
    "TunnelSnapshot",
    "WorkersSnapshot",
    "decode_message",
    "decode_request",
    "encode",
]

_T = TypeVar("_T")

# Job states as the batch systems name them, in the order status output lists them.
JOB_STATES = ("pending", "running", "done", "failed", "cancelled")


# -- the snapshot ---------------------------------------------------------------------


def _known(cls: type[Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of ``cls``; unknown keys (a newer engine's) are dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _plain(value: Any) -> Any:
    if isinstance(value, Event):
        return value.to_dict()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _fields_plain(obj: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


@dataclass(frozen=True)
class TcpSnapshot:
    """What the kernel knows of the tunnel's own TCP connection (``TCP_INFO``)."""

    rtt_ms: float = 0.0
    retransmits: int = 0
    total_retrans: int = 0
    unacked: int = 0
    backoff: int = 0
    last_ack_recv_ms: int = 0
    rto_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return _fields_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TcpSnapshot:
        """Rebuild from :meth:`to_dict` output."""
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class TunnelSnapshot:
    """One tunnel: where it goes, its state since when, and what it has been through."""

    label: str = ""
    via: str = ""
    remote_port: int = 0
    master_port: int = 0
    state: TunnelState = TunnelState.NEW
    since: float | None = None
    restarts: int = 0
    stalls: int = 0
    resumes: int = 0
    reclaims: int = 0
    last_error: str | None = None
    rtt_ms: float | None = None
    verified_by: str | None = None
    ssh_pid: int | None = None
    remote_pid: int | None = None
    recoveries: tuple[float, ...] = ()
    socket: str = "ssh"
    rto_capped: bool = False
    resume_grace: float | None = None
    tcp: TcpSnapshot | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (the state by its value)."""
        return _fields_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TunnelSnapshot:
        """Rebuild from :meth:`to_dict` output, or from ``Tunnel.snapshot()``'s mapping."""
        known = _known(cls, data)
        if "state" in known:
            known["state"] = TunnelState(known["state"])
        known["recoveries"] = tuple(float(r) for r in known.get("recoveries") or ())
        tcp = known.get("tcp")
        known["tcp"] = TcpSnapshot.from_dict(tcp) if isinstance(tcp, Mapping) else None
        return cls(**known)


@dataclass(frozen=True)
class WorkersSnapshot:
    """The master's workers as last sampled, and the most ever connected at once."""

    connected: int = 0
    idle: int = 0
    busy: int = 0
    peak: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return _fields_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkersSnapshot:
        """Rebuild from :meth:`to_dict` output."""
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class TasksSnapshot:
    """The master's tasks as last sampled."""

    waiting: int = 0
    running: int = 0
    on_workers: int = 0
    done: int = 0
    submitted: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return _fields_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TasksSnapshot:
        """Rebuild from :meth:`to_dict` output."""
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class JobsSnapshot:
    """The batch jobs started for a master: the system, jobs by state, and its limits.

    A job tracker fills the counts, ``submitted`` and ``submit_failures``; a
    ``work_queue_factory`` fills ``batch_type`` and ``factory_restarts`` instead.
    """

    system: str | None = None
    workdir: str | None = None
    batch_type: str | None = None
    pending: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    submitted: int | None = None
    min_workers: int | None = None
    max_workers: int | None = None
    submit_failures: int | None = None
    factory_restarts: int | None = None

    def count(self, state: str) -> int:
        """How many jobs are in ``state`` (one of :data:`JOB_STATES`)."""
        if state not in JOB_STATES:
            raise ValueError(f"unknown job state {state!r}")
        value: int = getattr(self, state)
        return value

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return _fields_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobsSnapshot:
        """Rebuild from :meth:`to_dict` output, or from a job tracker's ``snapshot()`` mapping."""
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class MasterSummary:
    """The master a tunnel serves, as the handle described it when attaching."""

    port: int
    name: str | None = None
    pid: int | None = None
    reply_timeout: int | None = None

    @classmethod
    def of(cls, info: MasterInfo) -> MasterSummary:
        """The summary of what a handle said (its password file stays out of status output)."""
        return cls(port=info.port, name=info.name, pid=info.pid, reply_timeout=info.reply_timeout)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return _fields_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MasterSummary:
        """Rebuild from :meth:`to_dict` output."""
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class MasterSnapshot:
    """One supervised master: its tunnel, workers, tasks and, when the supervisor starts them, jobs."""

    id: str
    master: MasterSummary
    tunnel: TunnelSnapshot
    workers: WorkersSnapshot = WorkersSnapshot()
    tasks: TasksSnapshot = TasksSnapshot()
    stats_age: float | None = None
    jobs: JobsSnapshot | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping; ``jobs`` is left out when the supervisor starts no workers."""
        data = _fields_plain(self)
        if self.jobs is None:
            del data["jobs"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MasterSnapshot:
        """Rebuild from :meth:`to_dict` output."""
        jobs = data.get("jobs")
        return cls(
            id=str(data.get("id", "?")),
            master=MasterSummary.from_dict(data.get("master") or {"port": 0}),
            tunnel=TunnelSnapshot.from_dict(data.get("tunnel") or {}),
            workers=WorkersSnapshot.from_dict(data.get("workers") or {}),
            tasks=TasksSnapshot.from_dict(data.get("tasks") or {}),
            stats_age=data.get("stats_age"),
            jobs=JobsSnapshot.from_dict(jobs) if isinstance(jobs, Mapping) else None,
        )


@dataclass(frozen=True)
class SupervisorSnapshot:
    """Everything an engine shows: the masters it supervises, those it did, and recent events."""

    version: str = ""
    pid: int | None = None
    started: float | None = None
    masters: tuple[MasterSnapshot, ...] = ()
    finished: tuple[MasterSnapshot, ...] = ()
    events: tuple[Event, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (what ``status --json`` prints for one supervisor)."""
        return _fields_plain(self)

    def to_json(self) -> str:
        """The snapshot as one JSON document."""
        return json.dumps(self.to_dict())

    def redacted(self) -> SupervisorSnapshot:
        """A copy with every registered secret and secret-named field hidden, for display."""
        return SupervisorSnapshot.from_dict(redact(self.to_dict()))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SupervisorSnapshot:
        """Rebuild from :meth:`to_dict` output; events of kinds this version does not know are dropped."""
        events: list[Event] = []
        for raw in data.get("events") or ():
            try:
                events.append(event_from_dict(raw))
            except (TypeError, ValueError):
                continue
        return cls(
            version=str(data.get("version", "")),
            pid=data.get("pid"),
            started=data.get("started"),
            masters=tuple(MasterSnapshot.from_dict(m) for m in data.get("masters") or ()),
            finished=tuple(MasterSnapshot.from_dict(m) for m in data.get("finished") or ()),
            events=tuple(events),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SupervisorSnapshot:
        """Rebuild from :meth:`to_json` output; raises ``ValueError`` for text that is not JSON."""
        return cls.from_dict(json.loads(text))


# -- requests -------------------------------------------------------------------------


@dataclass(frozen=True)
class Attach:
    """Start supervising ``master`` with ``settings``; answered by :class:`Attached`."""

    op: ClassVar[str] = "attach"
    master: MasterInfo
    settings: Settings

    def to_dict(self) -> dict[str, Any]:
        """The request as sent."""
        return {"op": self.op, "master": self.master.to_dict(), "settings": self.settings.to_dict()}


@dataclass(frozen=True)
class Detach:
    """Stop supervising the master attached as ``id``."""

    op: ClassVar[str] = "detach"
    id: str

    def to_dict(self) -> dict[str, Any]:
        """The request as sent."""
        return {"op": self.op, "id": self.id}


@dataclass(frozen=True)
class GetSnapshot:
    """Ask for the engine's :class:`SupervisorSnapshot`; answered by :class:`SnapshotReply`."""

    op: ClassVar[str] = "snapshot"

    def to_dict(self) -> dict[str, Any]:
        """The request as sent."""
        return {"op": self.op}


@dataclass(frozen=True)
class ReportStats:
    """The handle's own reading of the master's counters (its last word, when closing)."""

    op: ClassVar[str] = "stats"
    id: str
    stats: MasterStats

    def to_dict(self) -> dict[str, Any]:
        """The request as sent."""
        return {"op": self.op, "id": self.id, "stats": self.stats.to_dict()}


@dataclass(frozen=True)
class Adapt:
    """Change how many workers the engine keeps for the master attached as ``id``."""

    op: ClassVar[str] = "adapt"
    id: str
    minimum: int | None = None
    maximum: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The request as sent."""
        return {"op": self.op, "id": self.id, "minimum": self.minimum, "maximum": self.maximum}


@dataclass(frozen=True)
class Ping:
    """Ask whether the engine is there."""

    op: ClassVar[str] = "ping"

    def to_dict(self) -> dict[str, Any]:
        """The request as sent."""
        return {"op": self.op}


Request: TypeAlias = Attach | Detach | GetSnapshot | ReportStats | Adapt | Ping


def decode_request(line: bytes | str) -> Request:
    """Read one request line; raises :class:`~wqsupervisor.errors.WQSupervisorError` saying what is wrong.

    Settings that do not validate raise their own ``ConfigError`` with its hint.
    """
    try:
        data = json.loads(line)
    except ValueError:
        raise ProtocolError("not JSON") from None
    if not isinstance(data, Mapping):
        raise ProtocolError("not JSON")
    op = data.get("op")
    try:
        if op == "attach":
            settings = settings_from_kwargs(data.get("settings", {}))
            return Attach(master=MasterInfo.from_dict(data["master"]), settings=settings)
        if op == "detach":
            return Detach(id=str(data.get("id")))
        if op == "snapshot":
            return GetSnapshot()
        if op == "stats":
            return ReportStats(id=str(data["id"]), stats=MasterStats.from_any(data["stats"]))
        if op == "adapt":
            return Adapt(id=str(data["id"]), minimum=data.get("minimum"), maximum=data.get("maximum"))
        if op == "ping":
            return Ping()
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"bad request: {exc}") from None
    raise ProtocolError(f"unknown op {op!r}")


# -- replies and events ---------------------------------------------------------------


@dataclass(frozen=True)
class Attached:
    """The master is supervised as ``id``; its tunnel listens on ``remote_port`` of the head node."""

    id: str
    remote_port: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The reply as sent."""
        return {"reply": "attach", "id": self.id, "remote_port": self.remote_port}


@dataclass(frozen=True)
class Ack:
    """The request ``op`` was carried out; nothing more to say."""

    op: str

    def to_dict(self) -> dict[str, Any]:
        """The reply as sent."""
        return {"reply": self.op}


@dataclass(frozen=True)
class SnapshotReply:
    """The engine's snapshot, redacted on the way out."""

    snapshot: SupervisorSnapshot

    def to_dict(self) -> dict[str, Any]:
        """The reply as sent: secrets never leave the engine."""
        return {"reply": "snapshot", "data": redact(self.snapshot.to_dict())}


@dataclass(frozen=True)
class ErrorReply:
    """The request failed: what went wrong and, when known, what to do."""

    error: str
    hint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The reply as sent."""
        data: dict[str, Any] = {"reply": "error", "error": self.error}
        if self.hint is not None:
            data["hint"] = self.hint
        return data

    @classmethod
    def of(cls, exc: WQSupervisorError) -> ErrorReply:
        """The reply that carries ``exc`` to the handle."""
        return cls(error=exc.message, hint=exc.hint)

    def exception(self) -> WQSupervisorError:
        """The error to raise in the handle."""
        return WQSupervisorError(self.error, self.hint)


@dataclass(frozen=True)
class EventMessage:
    """An event pushed to every handle, with the state its tunnel is in afterwards."""

    event: Event
    state: TunnelState

    def to_dict(self) -> dict[str, Any]:
        """The message as sent, redacted."""
        return {"type": "event", "data": redact(self.event.to_dict()), "state": self.state.value}


Reply: TypeAlias = Attached | Ack | SnapshotReply | ErrorReply
Message: TypeAlias = Request | Reply | EventMessage


def encode(message: Message) -> bytes:
    """One message as the line sent on the socket."""
    return json.dumps(message.to_dict()).encode() + b"\n"


def decode_message(line: bytes | str) -> Reply | EventMessage | None:
    """Read one line a handle receives; None for a line it cannot read (skipped, as it always was)."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, Mapping):
        return None
    try:
        if data.get("type") == "event":
            return EventMessage(
                event=event_from_dict(data["data"]), state=TunnelState(data.get("state", "new"))
            )
        kind = data.get("reply")
        if kind is None:
            return None
        if kind == "error":
            hint = data.get("hint")
            return ErrorReply(error=str(data.get("error")), hint=str(hint) if hint is not None else None)
        if kind == "attach":
            port = data.get("remote_port")
            return Attached(id=str(data["id"]), remote_port=int(port) if port else None)
        if kind == "snapshot":
            return SnapshotReply(SupervisorSnapshot.from_dict(data["data"]))
        return Ack(op=str(kind))
    except (KeyError, TypeError, ValueError):
        return None


# -- the client -----------------------------------------------------------------------

_GONE = ErrorReply("the supervisor engine went away")


class EngineClient:
    """One connection to an engine: requests answered in order, and the events it pushes.

    A background thread reads the socket. Events go to ``on_event(event,
    state)`` on that thread; when the engine hangs up, ``on_close()`` is
    called there and every later request fails. One request is outstanding
    at a time; :meth:`request` raises
    :class:`~wqsupervisor.errors.WQSupervisorError` for an error reply, an
    engine that went away, or one that does not answer within ``reply_timeout``.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        on_event: Callable[[Event, TunnelState], None] | None = None,
        on_close: Callable[[], None] | None = None,
        reply_timeout: float = 15.0,
    ) -> None:
        self._sock = sock
        self._on_event = on_event
        self._on_close = on_close
        self.reply_timeout = reply_timeout
        self._replies: queue.Queue[Reply] = queue.Queue()
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="wqsupervisor-events", daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, path: str, *, timeout: float = 5.0, **options: Any) -> EngineClient:
        """Connect to the engine listening on the unix socket ``path``; raises ``OSError``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.settimeout(None)  # replies are bounded by reply_timeout instead
        except OSError:
            sock.close()
            raise
        options.setdefault("reply_timeout", timeout)
        return cls(sock, **options)

    def __repr__(self) -> str:
        return f"<EngineClient {'open' if self._reader.is_alive() else 'closed'}>"

    def _read(self) -> None:
        with self._sock.makefile("rb") as lines:
            try:
                for line in lines:
                    message = decode_message(line)
                    if isinstance(message, EventMessage):
                        if self._on_event is not None:
                            self._on_event(message.event, message.state)
                    elif message is not None:
                        self._replies.put(message)
            except OSError:
                pass
        if self._on_close is not None:
            self._on_close()
        self._replies.put(_GONE)

    def request(self, message: Request) -> Reply:
        """Send ``message`` and return its reply."""
        with self._send_lock:
            try:
                self._sock.sendall(encode(message))
            except OSError as exc:
                raise WQSupervisorError(f"the supervisor engine went away: {exc}") from None
            try:
                reply = self._replies.get(timeout=self.reply_timeout)
            except queue.Empty:
                raise WQSupervisorError("the supervisor engine did not answer") from None
            if reply is _GONE:
                self._replies.put(_GONE)  # and for every request after this one
        if isinstance(reply, ErrorReply):
            raise reply.exception()
        return reply

    def _expect(self, message: Request, kind: type[_T]) -> _T:
        reply = self.request(message)
        if not isinstance(reply, kind):
            raise ProtocolError(f"the engine answered {message.op!r} with {reply!r}")
        return reply

    def attach(self, master: MasterInfo, settings: Settings) -> Attached:
        """Ask the engine to supervise ``master``."""
        return self._expect(Attach(master=master, settings=settings), Attached)

    def detach(self, sup_id: str) -> None:
        """Ask the engine to stop supervising ``sup_id``."""
        self.request(Detach(sup_id))

    def snapshot(self) -> SupervisorSnapshot:
        """The engine's current snapshot."""
        return self._expect(GetSnapshot(), SnapshotReply).snapshot

    def report_stats(self, sup_id: str, stats: MasterStats) -> None:
        """Tell the engine the master's counters as the handle read them."""
        self.request(ReportStats(sup_id, stats))

    def adapt(self, sup_id: str, minimum: int | None, maximum: int | None) -> None:
        """Change the worker limits of ``sup_id``."""
        self.request(Adapt(sup_id, minimum, maximum))

    def ping(self) -> None:
        """Check that the engine answers."""
        self.request(Ping())

    def close(self, timeout: float | None = 10.0) -> None:
        """Hang up and wait for the reader thread. Safe to call twice."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout)

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The status snapshot: what an engine shows, as frozen dataclasses, and their JSON form.

The engine builds a :class:`SupervisorSnapshot`; the handle, ``status``, the
live view, metrics and the harness read its attributes. ``to_dict`` and
``from_dict`` are the only way in or out of JSON.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..events import Event, event_from_dict
from ..kinds import WORK_QUEUE
from ..lifecycle import TunnelState
from ..logs import redact
from ..master import MasterInfo

# Job states as the batch systems name them, in the order status output lists them.
JOB_STATES = ("pending", "running", "done", "failed", "cancelled")


def _known(cls: type[Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of ``cls``; unknown keys (a newer engine's) are dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):  # the snapshot's parts and events
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
class RelaySnapshot:
    """The head relay of a resumable tunnel, as the agent's end sees it."""

    connections: int = 0
    buffered: int = 0
    resumptions: int = 0
    last_resumption: float | None = None
    last_took: float | None = None
    head_pid: int | None = None

    def describe(self) -> str:
        """The relay in one line: what it holds, and its takeovers."""
        took = f", last took {self.last_took:.2f} s" if self.last_took is not None else ""
        return (
            f"relay holds {self.connections} connections, {self.buffered} bytes buffered; "
            f"resumed {self.resumptions} times{took}"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return _fields_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RelaySnapshot:
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
    relay: RelaySnapshot | None = None
    resume_off: str | None = None
    failed: str | None = None
    """The error that ended the tunnel for good (kept once it is closed)."""

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
        relay = known.get("relay")
        known["relay"] = RelaySnapshot.from_dict(relay) if isinstance(relay, Mapping) else None
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
    kind: str = WORK_QUEUE.name
    """``work_queue`` or ``taskvine`` (:mod:`wqsupervisor.kinds`)."""

    @classmethod
    def of(cls, info: MasterInfo) -> MasterSummary:
        """The summary of what a handle said (its password file stays out of status output)."""
        return cls(
            port=info.port, name=info.name, pid=info.pid, reply_timeout=info.reply_timeout, kind=info.kind
        )

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

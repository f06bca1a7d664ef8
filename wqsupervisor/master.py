"""The small contract a master meets to be supervised, and its stats snapshot.

A master is duck-typed. The supervisor needs:

* ``port`` (int): the port the master listens on for workers;
* ``stats``: a snapshot object (or mapping) with ``workers_connected`` and,
  when the master has them, ``workers_idle``, ``workers_busy``,
  ``tasks_waiting``, ``tasks_running``, ``tasks_on_workers``, ``tasks_done``
  and the cumulative ``workers_joined``/``workers_removed``;
* optionally ``name`` (the project name) and, for the features that use them,
  ``specify_password_file(path)`` and ``shutdown_workers(n)``.

``ndcctools.work_queue.WorkQueue``, Debian's ``work_queue.WorkQueue`` and
:class:`wqsupervisor.wqserver.WorkQueueServer` all meet it. Work Queue masters
are not thread-safe, so the supervisor reads ``stats`` only from the thread
that attaches or closes it; while the application runs, it watches the master
through the master's own status port instead (see :mod:`wqsupervisor.wqproto`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sized
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .errors import MasterError
from .kinds import WORK_QUEUE, kind_named, kind_of_object


@runtime_checkable
class Master(Protocol):
    """What the supervisor reads of a master object."""

    @property
    def port(self) -> int:
        """The port workers connect to."""
        ...

    @property
    def stats(self) -> Any:
        """A snapshot of the master's counters."""
        ...


@dataclass(frozen=True)
class MasterStats:
    """One snapshot of a master's counters (missing ones are 0)."""

    workers_connected: int = 0
    workers_init: int = 0
    workers_idle: int = 0
    workers_busy: int = 0
    workers_joined: int = 0
    workers_removed: int = 0
    tasks_waiting: int = 0
    tasks_on_workers: int = 0
    tasks_running: int = 0
    tasks_done: int = 0
    tasks_submitted: int = 0
    tasks_dispatched: int = 0
    """Sends of a task to a worker: above tasks_submitted when a task was tried again."""
    capacity_tasks: int = 0

    @classmethod
    def from_any(cls, source: Any) -> MasterStats:
        """Read a snapshot from a stats object, a mapping, or a status reply entry."""
        values: dict[str, int] = {}
        for f in dataclasses.fields(cls):
            raw = _read(source, f.name)
            if raw is None:
                raw = _read(source, "total_" + f.name)  # cctools 8 and 9 spell some counters so
            try:
                values[f.name] = int(raw) if raw is not None else 0
            except (TypeError, ValueError):
                values[f.name] = 0
        return cls(**values)

    def to_dict(self) -> dict[str, int]:
        """The snapshot as a plain mapping."""
        return dataclasses.asdict(self)


def _read(source: Any, name: str) -> Any:
    return source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)


@dataclass(frozen=True)
class MasterIdentity:
    """What tells one master apart from another behind the same port."""

    port: int
    project: str | None = None
    started: int | None = None

    @classmethod
    def from_status(cls, entry: Mapping[str, Any]) -> MasterIdentity:
        """Read the identity from a status reply entry."""
        started = entry.get("time_when_started", entry.get("starttime"))
        return cls(
            port=int(entry.get("port", 0)),
            project=entry.get("project") or None,
            started=int(started) if started is not None else None,
        )

    def matches(self, other: MasterIdentity) -> bool:
        """True when ``other`` can be the same master (unknown fields do not disagree)."""
        if self.port != other.port:
            return False
        if self.project and other.project and self.project != other.project:
            return False
        return not (self.started and other.started and self.started != other.started)

    def __str__(self) -> str:
        name = f"project {self.project!r}" if self.project else "no project name"
        return f"master on port {self.port} ({name})"


@dataclass(frozen=True)
class MasterInfo:
    """What the engine is told about a master when a supervisor attaches."""

    port: int
    name: str | None = None
    password_file: str | None = None
    pid: int | None = None
    reply_timeout: int | None = None
    kind: str = WORK_QUEUE.name
    """Which kind of master (:mod:`wqsupervisor.kinds`): its workers' program and factory follow."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MasterInfo:
        """Rebuild from :meth:`to_dict` output."""
        return cls(
            port=int(data["port"]),
            name=data.get("name"),
            password_file=data.get("password_file"),
            pid=data.get("pid"),
            reply_timeout=data.get("reply_timeout"),
            kind=kind_named(data.get("kind", WORK_QUEUE.name)).name,
        )


def describe(master: Any) -> MasterInfo:
    """Read the contract fields of ``master``, or explain which one is missing."""
    try:
        port = master.port
    except AttributeError:
        raise MasterError(
            f"{type(master).__name__} has no 'port' attribute",
            "pass a Work Queue master (ndcctools.work_queue.WorkQueue or WorkQueueServer) "
            "or a TaskVine manager (ndcctools.taskvine.Manager)",
        ) from None
    if callable(port):
        port = port()
    if not isinstance(port, int) or not 0 < port < 65536:
        raise MasterError(
            f"the master reports port {port!r}, which is not a listening port",
            "create the master before attaching, and check that it could bind its port",
        )
    name = getattr(master, "name", None)
    if callable(name):
        name = name()
    return MasterInfo(
        port=port, name=name if isinstance(name, str) and name else None, kind=kind_of_object(master).name
    )


def read_stats(master: Any) -> MasterStats:
    """Take one stats snapshot; call only from the thread that drives the master."""
    return MasterStats.from_any(master.stats)


def task_table(master: Any) -> Sized | None:
    """The binding's own table of tasks submitted and not yet returned by ``wait()``, if it keeps one.

    cctools' Python bindings (Debian's ``work_queue``, ``ndcctools.work_queue``
    and ``ndcctools.taskvine``) keep every submitted task in a plain dict,
    ``_task_table``, until ``wait()`` returns it. Its length can be read from
    any thread without calling into the master (no C call, no lock): a
    growing length is a submission.
    """
    table = getattr(master, "_task_table", None)
    return table if isinstance(table, dict) else None


def set_reply_timeout(master: Any, seconds: int) -> int | None:
    """Let ``master`` wait ``seconds`` for a worker's reply; the value set, or None if it was not.

    A Work Queue master asks a worker for its results and waits for the answer
    ``short-timeout`` seconds (5 by default), then drops the worker and requeues
    its tasks. Behind a tunnel that stalls and resumes, the request or the
    answer can sit in TCP's retransmission backoff for longer than that (6.4 s
    after a 20 s blackhole, measured), so the master drops workers that were
    never lost. With a supervisor the tunnel's own watch decides: the session
    resumes and the answer comes, or the supervisor replaces it, which closes
    every tunneled connection and ends the wait at once.

    Masters without ``tune`` (``WorkQueueServer``) are left as they are.
    """
    tune = getattr(master, "tune", None)
    if seconds <= 0 or not callable(tune):
        return None
    try:
        ok = tune("short-timeout", seconds) == 0
    except (TypeError, ValueError):  # a binding with another signature keeps its own timeout
        return None
    return seconds if ok else None

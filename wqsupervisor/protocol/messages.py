"""Requests, replies and pushed events of the control protocol, and their encoding.

One JSON object per line. Requests carry an ``op``, replies a ``reply``, and
events ``"type": "event"`` with the tunnel's state after them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

from ..config import Settings, settings_from_kwargs
from ..errors import ProtocolError, WQSupervisorError
from ..events import Event, event_from_dict
from ..lifecycle import TunnelState
from ..logs import redact
from ..master import MasterInfo, MasterStats
from .snapshot import SupervisorSnapshot

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
class Submitted:
    """The handle saw tasks submitted: ``outstanding`` tasks are now submitted and not yet returned.

    The engine samples the master at once instead of at its next interval:
    the master answers as soon as the script calls ``wait()``.
    """

    op: ClassVar[str] = "submitted"
    id: str
    outstanding: int

    def to_dict(self) -> dict[str, Any]:
        """The request as sent."""
        return {"op": self.op, "id": self.id, "outstanding": self.outstanding}


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


Request: TypeAlias = Attach | Detach | GetSnapshot | ReportStats | Submitted | Adapt | Ping


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
        if op == "submitted":
            return Submitted(id=str(data["id"]), outstanding=int(data["outstanding"]))
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

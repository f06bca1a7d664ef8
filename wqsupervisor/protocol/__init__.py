"""The engine's control protocol, in one place: messages, their encoding, the snapshot, one client.

Three modules: :mod:`.snapshot` (the status snapshot), :mod:`.messages`
(requests, replies, events and their encoding) and :mod:`.client`.

Handles talk to an engine over a unix socket, one JSON object per line::

    -> {"op": "attach", "master": {...}, "settings": {...}}
    <- {"reply": "attach", "id": "m1", "remote_port": 10001}
    <- {"type": "event", "data": {...}, "state": "up"}
    -> {"op": "snapshot"}      <- {"reply": "snapshot", "data": {...}}
    -> {"op": "detach", "id": "m1"}

Requests are small frozen dataclasses (:class:`Attach`, :class:`Detach`,
:class:`GetSnapshot`, :class:`ReportStats`, :class:`Submitted`, :class:`Adapt`,
:class:`Ping`),
replies likewise (:class:`Attached`, :class:`Ack`, :class:`SnapshotReply`,
:class:`ErrorReply`), and pushed events are :class:`EventMessage`. The status
snapshot is a tree of frozen dataclasses rooted at :class:`SupervisorSnapshot`;
the engine builds it, everyone else reads its attributes. JSON appears only
here: :func:`encode`, :func:`decode_request`, :func:`decode_message` and the
snapshots' ``to_dict``/``from_dict``. :class:`EngineClient` is the one client,
used by the drop-in :class:`~wqsupervisor.Supervisor` and by ``status``.
"""

from .client import EngineClient
from .messages import (
    Ack,
    Adapt,
    Attach,
    Attached,
    Detach,
    ErrorReply,
    EventMessage,
    GetSnapshot,
    Message,
    Ping,
    Reply,
    ReportStats,
    Request,
    SnapshotReply,
    Submitted,
    decode_message,
    decode_request,
    encode,
)
from .snapshot import (
    JOB_STATES,
    JobsSnapshot,
    MasterSnapshot,
    MasterSummary,
    SupervisorSnapshot,
    TasksSnapshot,
    TcpSnapshot,
    TunnelSnapshot,
    WorkersSnapshot,
)

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
    "Message",
    "Ping",
    "Reply",
    "ReportStats",
    "Request",
    "SnapshotReply",
    "Submitted",
    "SupervisorSnapshot",
    "TasksSnapshot",
    "TcpSnapshot",
    "TunnelSnapshot",
    "WorkersSnapshot",
    "decode_message",
    "decode_request",
    "encode",
]

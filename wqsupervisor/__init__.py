"""wqsupervisor keeps a Work Queue master reachable, and busy, through a supervised SSH tunnel."""

from ._version import __version__
from .backoff import Backoff, GiveUp, RestartPolicy, RestartState, Retry
from .config import Settings
from .errors import (
    AuthenticationFailed,
    ConfigError,
    IllegalTransition,
    MasterError,
    ProtocolError,
    TunnelError,
    WQSupervisorError,
)
from .events import (
    AllWorkersLost,
    Event,
    EventBus,
    JobsCancelled,
    JobsSubmitted,
    JobStateChanged,
    JobSubmitFailed,
    MasterUnreachable,
    StalePortReclaimed,
    TunnelClosed,
    TunnelDown,
    TunnelFailed,
    TunnelRestarting,
    TunnelResumed,
    TunnelStalled,
    TunnelStarting,
    TunnelUp,
    WorkerCountChanged,
    WorkerRejected,
    WorkersJoined,
    WorkersLost,
)
from .forward import ForwardCheck
from .lifecycle import TunnelState
from .master import Master, MasterIdentity, MasterInfo, MasterStats
from .supervisor import Supervisor, supervise
from .watch import WorkerWatch
from .wqserver import Task, TaskResult, WorkQueueServer

__all__ = [
    "AllWorkersLost",
    "AuthenticationFailed",
    "Backoff",
    "ConfigError",
    "Event",
    "EventBus",
    "ForwardCheck",
    "GiveUp",
    "IllegalTransition",
    "JobStateChanged",
    "JobSubmitFailed",
    "JobsCancelled",
    "JobsSubmitted",
    "Master",
    "MasterError",
    "MasterIdentity",
    "MasterInfo",
    "MasterStats",
    "MasterUnreachable",
    "ProtocolError",
    "RestartPolicy",
    "RestartState",
    "Retry",
    "Settings",
    "StalePortReclaimed",
    "Supervisor",
    "Task",
    "TaskResult",
    "TunnelClosed",
    "TunnelDown",
    "TunnelError",
    "TunnelFailed",
    "TunnelRestarting",
    "TunnelResumed",
    "TunnelStalled",
    "TunnelStarting",
    "TunnelState",
    "TunnelUp",
    "WQSupervisorError",
    "WorkQueueServer",
    "WorkerCountChanged",
    "WorkerRejected",
    "WorkerWatch",
    "WorkersJoined",
    "WorkersLost",
    "__version__",
    "supervise",
]

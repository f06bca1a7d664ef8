"""The one client of an engine, shared by the drop-in handle and ``status``."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..config import Settings
from ..errors import ProtocolError, WQSupervisorError
from ..events import Event
from ..lifecycle import TunnelState
from ..master import MasterInfo, MasterStats
from .messages import (
    Adapt,
    Attach,
    Attached,
    Detach,
    ErrorReply,
    EventMessage,
    GetSnapshot,
    Ping,
    Reply,
    ReportStats,
    Request,
    SnapshotReply,
    Submitted,
    decode_message,
    encode,
)
from .snapshot import SupervisorSnapshot

_T = TypeVar("_T")


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

    def submitted(self, sup_id: str, outstanding: int) -> None:
        """Tell the engine that tasks were submitted (it samples the master at once)."""
        self.request(Submitted(sup_id, outstanding))

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

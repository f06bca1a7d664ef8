"""The relay's streams, without I/O: every byte numbered, kept until acknowledged, replayed on reattach.

Both ends of the relay run this same code (the head node's copy under
Python 3.6, see :mod:`wqsupervisor.relay.program`). Each end owns one local
socket per stream (a worker's connection on the head, the master's in the
agent) and a carrier (the ssh session) that comes and goes. The I/O layer
tells the :class:`Mux` what its sockets did (:meth:`Mux.local_data`,
:meth:`Mux.local_eof`, :meth:`Mux.taken`...), feeds it the carrier's frames
(:meth:`Mux.feed`), acts on :attr:`Mux.events`, and writes what
:meth:`Mux.output` returns to the carrier.

Sequence space per direction: the data bytes, then one more for the end
(FIN), as in TCP. The receiver acknowledges only what its local socket took,
so a sender keeps at most :data:`WINDOW` unacknowledged bytes per stream and
a slow reader slows its sender (backpressure). Acknowledgements wait: they
ride along with the next frame going the other way, or go alone once
:data:`ACK_EVERY` bytes are owed or the I/O layer calls :meth:`Mux.flush_acks`
(after :data:`ACK_DELAY`), so a request and its answer cost one frame each. On :meth:`Mux.attach` every
stream sends again from the other side's last acknowledgement; the receiver
drops what it already has, so nothing is lost or duplicated.
"""

import collections
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple, Union

from .wire import ACK, DATA, FIN, HEADER, MAX_PAYLOAD, Decoder, WireError, encode

WINDOW = 4 * 1024 * 1024
ACK_EVERY = WINDOW // 4
ACK_DELAY = 0.01
"""Seconds an owed acknowledgement may wait for a frame to ride with (the I/O layer's timer)."""

Chunk = Union[bytes, memoryview]
Event = Tuple[str, int, Chunk]
"""``(kind, sid, data)``: ``open``, ``data``, ``eof`` (the other side ends), ``close`` (forget the socket)."""


def consume(chunks: Deque[Chunk], n: int) -> None:
    """Drop the first ``n`` bytes of ``chunks`` (what a write took): the I/O layers' write queues."""
    while n:
        first = chunks[0]
        if n >= len(first):
            chunks.popleft()
            n -= len(first)
        else:
            chunks[0] = memoryview(first)[n:]
            n = 0


class Stream:
    """One connection's state at this end (offsets are per direction)."""

    def __init__(self, sid: int) -> None:
        self.sid = sid
        # Read from our socket, not yet acknowledged: chunks as read, the first
        # starting at offset self.base, of which self.skip bytes are acknowledged.
        self.chunks: Deque[bytes] = collections.deque()
        self.base = 0
        self.skip = 0
        self.cursor = (0, 0)  # (index, offset) of a chunk at or before self.sent
        self.acked = 0  # what the other end took for good (read + 1 once our FIN is taken)
        self.sent = 0  # next offset to send on this carrier
        self.read = 0  # bytes read from our socket
        self.eof = False  # our socket ends: FIN goes at offset self.read
        self.fin_sent = False
        self.announced = False  # the empty DATA that opens the stream at the other end
        self.recv_next = 0  # next offset expected from the other end
        self.taken_bytes = 0  # what our socket took of it (what we acknowledge)
        self.fin_at: Optional[int] = None
        self.fin_taken = False
        self.ack_sent = 0
        self.dead = False  # our socket is gone: whatever still comes is dropped

    @property
    def ack_value(self) -> int:
        """What this end acknowledges."""
        return self.taken_bytes + (1 if self.fin_taken else 0)

    @property
    def buffered(self) -> int:
        """Bytes kept for the other end until it acknowledges them."""
        return self.read - self.base - self.skip

    @property
    def done(self) -> bool:
        """Both directions ended and acknowledged: the stream can be forgotten."""
        return self.eof and self.acked == self.read + 1 and self.fin_taken

    def keep(self, data: bytes) -> None:
        """Bytes read from our socket."""
        self.chunks.append(data)
        self.read += len(data)

    def forget(self, upto: int) -> None:
        """The other end has every byte before ``upto``: drop them."""
        drop = upto - self.base - self.skip
        while drop > 0:
            first = len(self.chunks[0]) - self.skip
            if drop < first:
                self.skip += drop
                return
            self.base += len(self.chunks.popleft())
            self.skip = 0
            drop -= first
            index, offset = self.cursor
            self.cursor = (index - 1, offset) if index > 0 else (0, self.base)

    def rewind(self) -> None:
        """Send again from the other end's last acknowledgement."""
        self.sent = min(self.acked, self.read)
        self.cursor = (0, self.base)

    def piece(self, limit: int) -> memoryview:
        """Up to ``limit`` contiguous bytes from offset :attr:`sent` (at least one when any is left)."""
        index, offset = self.cursor
        while offset + len(self.chunks[index]) <= self.sent:
            offset += len(self.chunks[index])
            index += 1
        self.cursor = (index, offset)
        start = self.sent - offset
        return memoryview(self.chunks[index])[start : start + limit]


class Mux:
    """All the streams of one relay end. ``opener``: this end accepts the connections (the head)."""

    def __init__(self, opener: bool) -> None:
        self.opener = opener
        self.streams: Dict[int, Stream] = {}
        # The streams that may have frames or acknowledgements to send: what output() looks at, so a
        # message on one of many connections costs the same as on one.
        self._active: Dict[int, Stream] = {}
        self.room_changed: Set[int] = set()
        """Streams whose :meth:`room` grew (acknowledged by the other end): the I/O layer reads them again."""
        self.events: List[Event] = []
        self.next_sid = 1
        self.max_seen = 0
        self.attached = False
        self._decoder = Decoder()
        self._control: List[bytes] = []
        self._turn = 0
        self._ack_now = False

    # -- what the local sockets did -------------------------------------------------

    def open(self) -> int:
        """A new local connection (head only); returns its stream id."""
        sid = self.next_sid
        self.next_sid += 1
        self.streams[sid] = self._active[sid] = Stream(sid)
        return sid

    def room(self, sid: int) -> int:
        """How many more bytes the stream may read from its socket now (0: wait for acks)."""
        s = self.streams.get(sid)
        if s is None or s.eof:
            return 0
        return max(0, WINDOW - s.buffered)

    def local_data(self, sid: int, data: bytes) -> None:
        """Bytes read from the stream's socket (kept as they are: pass bytes, not a reused buffer)."""
        s = self.streams[sid]
        s.keep(data)
        self._active[sid] = s

    def local_eof(self, sid: int) -> None:
        """The stream's socket will give no more bytes."""
        s = self.streams.get(sid)
        if s is not None:
            s.eof = True
            self._active[sid] = s
            self._check(s)

    def local_gone(self, sid: int) -> None:
        """The stream's socket failed or was closed: end our direction, drop what comes."""
        s = self.streams.get(sid)
        if s is None:
            return
        s.eof = True
        s.dead = True
        if s.fin_at is not None:
            s.fin_taken = True
        self._active[sid] = s
        self._check(s)

    def taken(self, sid: int, n: int) -> None:
        """The stream's socket took ``n`` more bytes of what :attr:`events` delivered."""
        s = self.streams.get(sid)
        if s is not None and n:
            s.taken_bytes += n
            self._active[sid] = s

    def took_fin(self, sid: int) -> None:
        """The stream's socket was told the other end ended (after all its bytes)."""
        s = self.streams.get(sid)
        if s is not None:
            s.fin_taken = True
            self._active[sid] = s
            self._check(s)

    # -- the carrier ----------------------------------------------------------------------

    def attach(self) -> None:
        """The carrier's greeting is done: send everything unacknowledged again, and our acks."""
        self.attached = True
        self._ack_now = True
        self._active = dict(self.streams)
        for s in self.streams.values():
            s.rewind()
            s.fin_sent = s.acked > s.read
            s.announced = s.acked > 0
            s.ack_sent = -1

    def detach(self) -> None:
        """The carrier is gone (or a new one starts its greeting); keep every stream for the next."""
        self.attached = False
        self._decoder = Decoder()
        self._control = []

    def reset(self) -> None:
        """The other end lost its state: every stream ends now."""
        for sid in list(self.streams):
            self.events.append(("close", sid, b""))
        self.streams.clear()
        self._active.clear()
        self.room_changed.clear()
        self.max_seen = 0

    def control(self, kind: int, value: int = 0, payload: bytes = b"") -> None:
        """Queue a control frame, sent before any data."""
        self._control.append(encode(kind, 0, value, payload))

    def flush_acks(self) -> None:
        """Send every owed acknowledgement with the next :meth:`output`, alone if need be."""
        self._ack_now = True

    def owes_acks(self) -> bool:
        """Some acknowledgement waits for a frame to ride with (arm a timer: :data:`ACK_DELAY`)."""
        return any(s.ack_value != s.ack_sent for s in self._active.values())

    def feed(self, data: bytes, on_control: Callable[[int, int, bytes], None]) -> None:
        """Bytes from the carrier; ``on_control(kind, value, payload)`` takes every other frame, in order.

        Raises WireError when the bytes are not frames of ours.
        """
        for kind, sid, value, payload in self._decoder.feed(data):
            if kind == DATA:
                self._on_data(sid, value, payload)
            elif kind == FIN:
                self._on_fin(sid, value)
            elif kind == ACK:
                self._on_ack(sid, value)
            else:
                on_control(kind, value, bytes(payload))

    def _stream_for(self, sid: int, end: int) -> Optional[Stream]:
        s = self.streams.get(sid)
        if s is not None:
            return s
        if not self.opener and sid > self.max_seen:
            self.max_seen = sid
            s = self.streams[sid] = Stream(sid)
            self.events.append(("open", sid, b""))
            return s
        # A stream both ends finished, whose last ack was lost: acknowledge it again.
        self._control.append(encode(ACK, sid, end))
        return None

    def _on_data(self, sid: int, offset: int, payload: memoryview) -> None:
        end = offset + len(payload)
        s = self._stream_for(sid, end)
        if s is None or end <= s.recv_next:
            if s is not None and len(payload):
                s.ack_sent = -1  # a replay of what we have: say so at once
                self._active[sid] = s
            return
        if offset > s.recv_next:
            raise WireError("stream %d: a gap at %d (expected %d)" % (sid, offset, s.recv_next))
        fresh = payload[s.recv_next - offset :]
        s.recv_next = end
        if s.dead:
            s.taken_bytes += len(fresh)
            self._active[sid] = s
        else:
            self.events.append(("data", sid, fresh))

    def _on_fin(self, sid: int, offset: int) -> None:
        s = self._stream_for(sid, offset + 1)
        if s is None or s.fin_at is not None:
            if s is not None:
                s.ack_sent = -1
                self._active[sid] = s
            return
        if offset != s.recv_next:
            raise WireError("stream %d: end at %d, expected %d" % (sid, offset, s.recv_next))
        s.fin_at = offset
        if s.dead:
            s.fin_taken = True
            self._check(s)
        else:
            self.events.append(("eof", sid, b""))

    def _on_ack(self, sid: int, value: int) -> None:
        s = self.streams.get(sid)
        if s is None or value <= s.acked:
            return
        data_acked = min(value, s.read)
        s.forget(data_acked)
        s.acked = value
        s.sent = max(s.sent, data_acked)
        self.room_changed.add(sid)
        self._check(s)

    def _check(self, s: Stream) -> None:
        if s.done and s.ack_value == s.ack_sent and self.streams.get(s.sid) is s:
            del self.streams[s.sid]
            self._active.pop(s.sid, None)
            self.events.append(("close", s.sid, b""))

    # -- what goes to the carrier ----------------------------------------------------------

    def _ack_due(self, s: Stream) -> bool:
        owed = s.ack_value - s.ack_sent
        return owed != 0 and (self._ack_now or s.fin_taken or s.ack_sent < 0 or owed >= ACK_EVERY)

    def _has_frames(self, s: Stream) -> bool:
        return s.sent < s.read or (s.eof and not s.fin_sent) or (self.opener and not s.announced)

    def output(self, limit: int = 1024 * 1024) -> bytes:
        """Frames to write to the carrier now (up to about ``limit`` bytes); b"" when none."""
        return b"".join(self.output_parts(limit))

    def output_parts(self, limit: int = 1024 * 1024) -> List[Chunk]:
        """:meth:`output` as the pieces to write in order (views of the kept bytes, no copy)."""
        if not self.attached:
            return []
        parts: List[Chunk] = list(self._control)
        self._control = []
        streams = list(self._active.values())
        # Owed acks ride with any frame that goes anyway; alone only when due.
        riding = bool(parts) or any(self._has_frames(s) for s in streams)
        for s in streams:
            if s.ack_value != s.ack_sent and (riding or self._ack_due(s)):
                parts.append(encode(ACK, s.sid, s.ack_value))
                s.ack_sent = s.ack_value
        self._ack_now = False
        if self.opener:
            # In id order: the agent takes an id below one it has seen for a finished stream.
            for s in sorted((s for s in streams if not s.announced), key=lambda s: s.sid):
                parts.append(encode(DATA, s.sid, 0, b""))
                s.announced = True
        if streams:
            self._turn = (self._turn + 1) % len(streams)
            streams = streams[self._turn :] + streams[: self._turn]
        size = 0
        for s in streams:
            while s.sent < s.read and size < limit:
                piece = s.piece(min(MAX_PAYLOAD, limit - size))
                parts.append(HEADER.pack(DATA, s.sid, s.sent, len(piece)))
                parts.append(piece)
                s.sent += len(piece)
                size += len(piece)
            if s.eof and not s.fin_sent and s.sent == s.read:
                parts.append(encode(FIN, s.sid, s.read))
                s.fin_sent = True
        for s in streams:
            self._check(s)
            if not self._has_frames(s) and s.ack_value == s.ack_sent:
                self._active.pop(s.sid, None)
        return parts

    def wants_output(self) -> bool:
        """True when :meth:`output` has something to send."""
        if not self.attached:
            return False
        if self._control:
            return True
        return any(self._has_frames(s) or self._ack_due(s) for s in self._active.values())

    # -- figures ------------------------------------------------------------------------------

    def buffered(self) -> int:
        """Bytes kept for replay (read here, not yet acknowledged by the other end)."""
        return sum(s.buffered for s in self.streams.values())

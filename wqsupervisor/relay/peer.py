"""The agent's side of the relay: one connection to the master per worker connection held on the head.

A :class:`RelayPeer` lives as long as its tunnel, across sessions: each new
session's stdin/stdout becomes its carrier (:class:`Carrier`,
:meth:`RelayPeer.attach`), and
when a session dies the peer keeps every master connection and everything
the head has not acknowledged, so the next session carries on where the last
one stopped. It runs in the agent's event loop (never in the application's
process, whose ``wait()`` holds the GIL), with protocols rather than streams:
a frame's bytes go to the master's socket from the carrier's read, with no
task, queue or copy in between.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import itertools
import os
import time
from dataclasses import dataclass

from ..session import Owner
from .core import ACK_DELAY, Chunk, Mux, consume
from .wire import BYE, HELLO, PING, PONG, REFUSED, SHUTDOWN, WELCOME, WireError, encode

__all__ = ["Carrier", "RelayEnded", "RelayPeer", "RelayRefused", "RelayStats"]

PIPE_SIZE = 1024 * 1024
CARRIER_HIGH = 1024 * 1024
ABANDON_AFTER = 5.0
"""Seconds a connection whose head side ended waits for the master to take it, then is dropped."""


class RelayEnded(Exception):
    """The carrier ended (or was replaced) while something waited on it."""


class RelayRefused(RelayEnded):
    """The head relay serves another supervisor whose session is alive; the message names it."""

    def __init__(self, owner: str) -> None:
        super().__init__(owner)
        self.owner = owner


@dataclass(frozen=True)
class RelayStats:
    """The relay as the agent sees it, for status and metrics."""

    connections: int
    buffered: int
    resumptions: int
    fresh_starts: int
    last_resumption: float | None
    last_took: float | None
    head_pid: int | None


class _Master(asyncio.Protocol):
    """One connection to the master, for stream ``sid``: written straight from the carrier's frames.

    It is made when the worker's first bytes arrive, not when the worker
    connects: Work Queue and TaskVine clients speak first (a worker's
    handshake or password challenge, a status request), so a program on the
    head node that connects and stays silent never reaches the master, whose
    handshake runs under the long ``short-timeout`` the supervisor sets.
    Its transport pauses at any buffered byte (``high=0``), so what it took
    for good (and what the head may forget) is what reached the kernel.
    """

    def __init__(self, peer: RelayPeer, sid: int) -> None:
        self.peer = peer
        self.sid = sid
        self.transport: asyncio.Transport | None = None
        self.waiting: list[bytes | memoryview] = []  # frames that came before the connection
        self.handed = 0  # bytes given to the transport
        self.reported = 0  # of those, what the mux was told was taken
        self.eof_due = False  # the head's side ended: half-close once every byte is out
        self.reading = True
        self.gone = False
        self.connecting: asyncio.Future[None] | None = None

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self, self.peer.master_host, self.peer.master_port)
        except OSError:
            self._gone()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=0)
        for data in self.waiting:
            self.deliver(data)
        self.waiting = []
        self.refresh()

    def data_received(self, data: bytes) -> None:
        mux = self.peer.mux
        if self.sid not in mux.streams:
            return
        mux.local_data(self.sid, data)
        if mux.room(self.sid) <= 0:
            self.pause()
        self.peer.flush()  # at once: a turn of the loop is a wait every answer would pay

    def eof_received(self) -> bool:
        self.peer.mux.local_eof(self.sid)
        self.peer.kick()
        return True  # keep our direction open: the head may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._gone()

    def resume_writing(self) -> None:
        self.refresh()
        self.peer.kick()

    def _gone(self) -> None:
        if not self.gone:
            self.gone = True
            self.peer.mux.local_gone(self.sid)
            self.peer.kick()

    def pause(self) -> None:
        if self.reading and self.transport is not None:
            self.transport.pause_reading()
            self.reading = False

    def resume(self) -> None:
        if not self.reading and self.transport is not None and self.peer.mux.room(self.sid) > 0:
            self.transport.resume_reading()
            self.reading = True

    def deliver(self, data: bytes | memoryview) -> None:
        """Bytes from the head, in order (the first ones connect to the master)."""
        if self.transport is None:
            if self.gone:
                self.peer.mux.taken(self.sid, len(data))
            else:
                self.waiting.append(data)
                if self.connecting is None and len(data):
                    self.connecting = asyncio.ensure_future(self._connect())
            return
        self.transport.write(data)
        self.handed += len(data)
        self.peer.unsettled.add(self.sid)

    def end(self) -> None:
        """The head's side ended (after every byte delivered)."""
        if self.connecting is None and not self.waiting:
            # Connected and left without a word: the master never hears of it.
            self._gone()
            self.peer.mux.took_fin(self.sid)
            return
        if self.transport is None and not self.gone:
            # Ended before the master took the connection: a master out of wait() accepts none, and
            # a probe that gave up would wait in its backlog. A half-close that waits for an answer
            # is given ABANDON_AFTER seconds (Work Queue and TaskVine clients never half-close).
            asyncio.get_running_loop().call_later(ABANDON_AFTER, self._abandon)
        self.eof_due = True
        self.peer.unsettled.add(self.sid)
        self.refresh()

    def _abandon(self) -> None:
        if self.transport is None and not self.gone:
            if self.connecting is not None:
                self.connecting.cancel()
            self.waiting = []
            self._gone()
            self.refresh()

    def refresh(self) -> bool:
        """Tell the mux what reached the master's socket (and the end, once it has); True: all told."""
        t = self.transport
        if t is None:
            if self.gone and self.eof_due:
                self.eof_due = False
                self.peer.mux.took_fin(self.sid)
            return self.gone
        taken = self.handed - t.get_write_buffer_size()
        if taken > self.reported:
            self.peer.mux.taken(self.sid, taken - self.reported)
            self.reported = taken
        if self.eof_due and taken == self.handed and not self.waiting:
            self.eof_due = False
            if t.can_write_eof():
                t.write_eof()
            self.peer.mux.took_fin(self.sid)
        return taken == self.handed and not self.eof_due

    def close(self, abort: bool = False) -> None:
        """End the master connection: gracefully when its stream is done, at once when the relay ends."""
        if self.connecting is not None:
            self.connecting.cancel()
        if self.transport is not None:
            if abort:
                self.transport.abort()  # close() would wait to flush to a master that may be gone
            else:
                self.transport.close()


class _CarrierIn(asyncio.Protocol):
    """The session's stdout: one greeting line, then the head relay's frames."""

    def __init__(self, carrier: Carrier) -> None:
        self.carrier = carrier

    def data_received(self, data: bytes) -> None:
        self.carrier.received(data)

    def eof_received(self) -> bool:
        self.carrier.ended()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.carrier.ended()


class Carrier:
    """One session's stdin and stdout as the relay's carrier.

    Opened on the two pipe ends the session's ssh was started with; the
    first line that comes is the session's greeting (:attr:`greeting`), and
    whatever follows goes to the peer once :meth:`RelayPeer.attach` made this
    carrier current.
    """

    def __init__(self, peer: RelayPeer) -> None:
        loop = asyncio.get_running_loop()
        self.peer = peer
        self.greeting: asyncio.Future[str] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.paused = False
        self.current = False
        self._early = bytearray()
        self._in: asyncio.ReadTransport | None = None
        # The session's stdin, written by us: frames go out as the views the mux
        # keeps (os.writev, no join), the rest waits here for the pipe to drain.
        self._out_fd: int | None = None
        self._out: collections.deque[Chunk] = collections.deque()
        self._out_bytes = 0
        self._writer = False

    @classmethod
    async def open(cls, peer: RelayPeer, read_fd: int, write_fd: int) -> Carrier:
        """A carrier on the session's stdout (``read_fd``) and stdin (``write_fd``); takes both."""
        loop = asyncio.get_running_loop()
        self = cls(peer)
        for fd in (read_fd, write_fd):
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        os.set_blocking(write_fd, False)
        self._out_fd = write_fd
        try:
            self._in, _ = await loop.connect_read_pipe(lambda: _CarrierIn(self), os.fdopen(read_fd, "rb", 0))
        except BaseException:
            self._close_out()
            raise
        return self

    def write(self, *parts: Chunk) -> None:
        """Queue bytes for the session's stdin and write what the pipe takes now."""
        if self._out_fd is None:
            return
        for part in parts:
            self._out.append(part)
            self._out_bytes += len(part)
        self._write()

    def _write(self) -> None:
        fd = self._out_fd
        while self._out and fd is not None:
            try:
                n = os.writev(fd, list(itertools.islice(self._out, 64)))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()  # the session's ssh is gone
                return
            self._out_bytes -= n
            consume(self._out, n)
        want = bool(self._out)
        if want != self._writer and fd is not None:
            loop = asyncio.get_running_loop()
            if want:
                loop.add_writer(fd, self._write)
            else:
                loop.remove_writer(fd)
            self._writer = want
        was, self.paused = self.paused, self._out_bytes > CARRIER_HIGH
        if was and not self.paused:
            self.peer.kick()

    def _close_out(self) -> None:
        fd, self._out_fd = self._out_fd, None
        if fd is not None:
            if self._writer:
                asyncio.get_running_loop().remove_writer(fd)
                self._writer = False
            with contextlib.suppress(OSError):
                os.close(fd)
        self._out.clear()
        self._out_bytes = 0

    def received(self, data: bytes) -> None:
        if not self.greeting.done():
            self._early += data
            line, newline, rest = self._early.partition(b"\n")
            if not newline:
                if len(self._early) > 4096:
                    self.greeting.set_result(bytes(self._early[:200]).decode(errors="replace"))
                    self.ended()
                return
            self.greeting.set_result(line.decode(errors="replace").strip())
            self._early = bytearray(rest)
            return
        if not self.current:
            self._early += data
            return
        self.peer._carrier_data(self, data)

    def start(self) -> None:
        """This carrier is current: pass on what came after the greeting."""
        self.current = True
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            self.peer._carrier_data(self, early)

    def ended(self) -> None:
        if not self.greeting.done():
            self.greeting.set_exception(RelayEnded("the session ended before its greeting"))
        if not self.lost.done():
            self.lost.set_result(None)
            self.peer._carrier_ended(self)

    def close(self) -> None:
        """Let go of both pipes."""
        if self._in is not None:
            self._in.close()
        self._close_out()
        self.ended()


class RelayPeer:
    """The agent's end of one tunnel's relay, reattached by each new session."""

    def __init__(self, master_host: str, master_port: int, keepalive: float = 5.0) -> None:
        self.master_host = master_host
        self.master_port = master_port
        self.keepalive = keepalive
        self.mux = Mux(opener=False)
        self.epoch = os.urandom(12).hex().encode()
        self._conns: dict[int, _Master] = {}
        self.unsettled: set[int] = set()
        """Master connections with bytes handed to their socket that the mux has not been told were taken."""
        self._carrier: Carrier | None = None
        self._kicked = False
        self._ack_timer: asyncio.TimerHandle | None = None
        self._welcome: asyncio.Future[str] | None = None
        self._bye: asyncio.Future[None] | None = None
        self._pongs: dict[int, asyncio.Future[None]] = {}
        self._ping_seq = 0
        self.resumptions = 0
        self.fresh_starts = 0
        self.last_resumption: float | None = None
        self.head_pid: int | None = None
        self.generation = 0
        """Counts carriers: a session lets go of the peer only while its own carrier is current."""
        self.ended = False
        """The head relay said goodbye: nothing is left on the head node."""
        self.last_took: float | None = None
        self._lost_at: float | None = None

    # -- carriers -------------------------------------------------------------------

    async def attach(self, carrier: Carrier) -> str:
        """Make ``carrier`` current; returns ``fresh`` or ``resumed`` once the head answered.

        Raises :class:`RelayEnded` when the carrier ends before the head's answer.
        """
        self.detach()
        self.generation += 1
        self._welcome = asyncio.get_running_loop().create_future()
        self._carrier = carrier
        carrier.write(encode(HELLO, payload=self.epoch + b" " + Owner.here(self.keepalive).words().encode()))
        carrier.start()
        if carrier.lost.done():
            self._carrier_ended(carrier)
        return await asyncio.shield(self._welcome)

    def detach(self) -> None:
        """Stop using the current carrier (it died or is being replaced); keep every stream."""
        carrier, self._carrier = self._carrier, None
        if carrier is not None:
            carrier.current = False
            if self._lost_at is None:
                self._lost_at = asyncio.get_running_loop().time()
        self.mux.detach()
        self._fail_waiters()

    def _fail_waiters(self) -> None:
        for fut in (self._welcome, self._bye, *self._pongs.values()):
            if fut is not None and not fut.done():
                fut.set_exception(RelayEnded("the relay's carrier ended"))

    def _carrier_ended(self, carrier: Carrier) -> None:
        if carrier is self._carrier:
            self.detach()

    async def carrier_lost(self) -> None:
        """Wait until the current carrier ends."""
        if self._carrier is not None:
            await asyncio.shield(self._carrier.lost)

    def _carrier_data(self, carrier: Carrier, data: bytes) -> None:
        if carrier is not self._carrier:
            return
        try:
            self.mux.feed(data, self._on_control)
        except WireError:
            carrier.close()
            return
        self._apply_events()
        for sid in self.mux.room_changed:
            conn = self._conns.get(sid)
            if conn is not None:
                conn.resume()
        self.mux.room_changed.clear()
        self.flush()

    def flush(self) -> None:
        """Write what has to go to the head now."""
        if self._kicked:
            return  # a flush is due this turn anyway
        self._flush()

    def kick(self) -> None:
        """Something may have to go to the head: write it once this turn of the loop is done."""
        if not self._kicked:
            self._kicked = True
            asyncio.get_running_loop().call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._kicked = False
        self._flush()

    def _flush(self) -> None:
        for sid in list(self.unsettled):
            conn = self._conns.get(sid)
            if conn is None or conn.refresh():
                self.unsettled.discard(sid)
        carrier = self._carrier
        if carrier is not None and self.mux.attached:
            while not carrier.paused and self.mux.wants_output():
                carrier.write(*self.mux.output_parts())
                self._apply_events()
        if self.mux.owes_acks():
            if self._ack_timer is None:
                self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._acks_due)
        elif self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    def _acks_due(self) -> None:
        self._ack_timer = None
        self.mux.flush_acks()
        self.kick()

    def _on_control(self, kind: int, value: int, payload: bytes) -> None:
        if kind == WELCOME:
            words = payload.decode(errors="replace").split()
            fresh = not words or words[0] != "resumed"
            if len(words) > 1 and words[1].isdigit():
                self.head_pid = int(words[1])
            if fresh:
                # A new relay (the old one lingered out, or was killed): its
                # connections are new, ours to the master must end.
                self.mux.reset()
                self._apply_events()
                self.fresh_starts += 1
            else:
                self.resumptions += 1
                now = asyncio.get_running_loop().time()
                self.last_resumption = time.time()
                if self._lost_at is not None:
                    self.last_took = now - self._lost_at
            self._lost_at = None
            self.ended = False  # a relay answered: there is one on the head again
            self.mux.attach()
            self.kick()
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_result("fresh" if fresh else "resumed")
        elif kind == PONG:
            fut = self._pongs.get(value)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif kind == BYE and self._bye is not None and not self._bye.done():
            self._bye.set_result(None)
        elif kind == REFUSED and self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(RelayRefused(payload.decode(errors="replace")))

    def _apply_events(self) -> None:
        events, self.mux.events = self.mux.events, []
        for kind, sid, data in events:
            if kind == "open":
                self._conns[sid] = _Master(self, sid)
            elif kind == "data":
                conn = self._conns.get(sid)
                if conn is None:
                    self.mux.taken(sid, len(data))
                else:
                    conn.deliver(data)
            elif kind == "eof":
                conn = self._conns.get(sid)
                if conn is None:
                    self.mux.took_fin(sid)
                else:
                    conn.end()
            elif kind == "close":
                conn = self._conns.pop(sid, None)
                if conn is not None:
                    conn.close()

    # -- pings and the end ----------------------------------------------------------

    async def ping(self) -> float:
        """One round trip to the head relay and back; returns its seconds (wrap it in a timeout)."""
        if self._carrier is None or not self.mux.attached:
            raise RelayEnded("no carrier")
        loop = asyncio.get_running_loop()
        self._ping_seq += 1
        seq = self._ping_seq
        fut: asyncio.Future[None] = loop.create_future()
        self._pongs[seq] = fut
        sent = loop.time()
        try:
            self.mux.control(PING, seq)
            self.kick()
            await fut
            return loop.time() - sent
        finally:
            self._pongs.pop(seq, None)

    async def shutdown(self, timeout: float = 3.0) -> bool:
        """End the head relay (it closes every worker connection); True when it said goodbye."""
        said = self.ended
        if not said and self._carrier is not None and self.mux.attached:
            self._bye = asyncio.get_running_loop().create_future()
            self.mux.control(SHUTDOWN)
            self.kick()
            with contextlib.suppress(RelayEnded, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._bye), timeout)
                said = True
        self.ended = self.ended or said
        await self.close()
        return said

    async def close(self) -> None:
        """Drop the carrier and every master connection (the head relay is left to its linger)."""
        self.detach()
        conns, self._conns = list(self._conns.values()), {}
        self.unsettled.clear()
        for conn in conns:
            conn.close(abort=True)
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self.mux = Mux(opener=False)
        # A new identity: a relay that still holds connections for the old one
        # must drop them when this peer attaches again, not replay into nothing.
        self.epoch = os.urandom(12).hex().encode()

    def stats(self) -> RelayStats:
        """Connections held, bytes kept for replay, resumptions."""
        return RelayStats(
            connections=len(self.mux.streams),
            buffered=self.mux.buffered(),
            resumptions=self.resumptions,
            fresh_starts=self.fresh_starts,
            last_resumption=self.last_resumption,
            last_took=self.last_took,
            head_pid=self.head_pid,
        )

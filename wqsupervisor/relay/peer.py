"""The agent's side of the relay: one connection to the master per worker connection held on the head.

A :class:`RelayPeer` lives as long as its tunnel, across sessions: each new
session's stdin/stdout becomes its carrier (:meth:`RelayPeer.attach`), and
when a session dies the peer keeps every master connection and everything
the head has not acknowledged, so the next session carries on where the last
one stopped. It runs in the agent's event loop (never in the application's
process, whose ``wait()`` holds the GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass

from .core import Mux
from .wire import BYE, HELLO, MAX_PAYLOAD, PING, PONG, SHUTDOWN, WELCOME, WireError, encode

__all__ = ["RelayEnded", "RelayPeer", "RelayStats"]


class RelayEnded(Exception):
    """The carrier ended (or was replaced) while something waited on it."""


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


class _Conn:
    """One master connection, for stream ``sid``."""

    def __init__(self, peer: RelayPeer, sid: int) -> None:
        self.peer = peer
        self.sid = sid
        self.writer: asyncio.StreamWriter | None = None
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.room = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name=f"relay-stream-{sid}")

    async def _run(self) -> None:
        peer = self.peer
        try:
            reader, writer = await asyncio.open_connection(peer.master_host, peer.master_port)
        except OSError:
            peer.mux.local_gone(self.sid)
            peer.kick()
            return
        self.writer = writer
        down = asyncio.create_task(self._downstream(writer), name=f"relay-down-{self.sid}")
        try:
            await self._upstream(reader)
            await down
        finally:
            down.cancel()

    async def _upstream(self, reader: asyncio.StreamReader) -> None:
        """Master -> head: read only while the stream has room (the head's acks make more)."""
        peer = self.peer
        while True:
            room = peer.mux.room(self.sid)
            if room <= 0:
                if self.sid not in peer.mux.streams:
                    return
                self.room.clear()
                await self.room.wait()
                continue
            try:
                data = await reader.read(min(room, MAX_PAYLOAD))
            except OSError:
                peer.mux.local_gone(self.sid)
                peer.kick()
                return
            if not data:
                peer.mux.local_eof(self.sid)
                peer.kick()
                return
            peer.mux.local_data(self.sid, data)
            peer.kick()

    async def _downstream(self, writer: asyncio.StreamWriter) -> None:
        """Head -> master, acknowledging what the master's socket took."""
        peer = self.peer
        while True:
            item = await self.queue.get()
            try:
                if item is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    peer.mux.took_fin(self.sid)
                    peer.kick()
                    return
                writer.write(item)
                await writer.drain()
            except (OSError, RuntimeError):
                peer.mux.local_gone(self.sid)
                peer.kick()
                return
            peer.mux.taken(self.sid, len(item))
            peer.kick()

    def close(self, abort: bool = False) -> None:
        """End the master connection: gracefully when its stream is done, at once when the relay ends."""
        self.task.cancel()
        if self.writer is not None:
            if abort:
                # close() would wait to flush to a master that may be gone or stopped.
                self.writer.transport.abort()
            else:
                self.writer.close()


class RelayPeer:
    """The agent's end of one tunnel's relay, reattached by each new session."""

    def __init__(self, master_host: str, master_port: int) -> None:
        self.master_host = master_host
        self.master_port = master_port
        self.mux = Mux(opener=False)
        self.epoch = os.urandom(12).hex().encode()
        self._conns: dict[int, _Conn] = {}
        self._carrier: list[asyncio.Task[None]] = []
        self._writer: asyncio.StreamWriter | None = None
        self._wake = asyncio.Event()
        self._welcome: asyncio.Future[str] | None = None
        self._bye: asyncio.Future[None] | None = None
        self._pongs: dict[int, asyncio.Future[None]] = {}
        self._ping_seq = 0
        self._lost: asyncio.Future[None] | None = None
        self.resumptions = 0
        self.fresh_starts = 0
        self.last_resumption: float | None = None
        self.head_pid: int | None = None
        self.generation = 0
        self.ended = False
        """The head relay said goodbye: nothing is left on the head node."""
        self.last_took: float | None = None
        self._lost_at: float | None = None
        """Counts carriers: a session lets go of the peer only while its own carrier is current."""

    # -- carriers -------------------------------------------------------------------

    async def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        """Make this reader/writer the carrier; returns ``fresh`` or ``resumed`` once the head answered.

        Raises :class:`RelayEnded` when the carrier ends before the head's answer.
        """
        self.detach()
        self.generation += 1
        loop = asyncio.get_running_loop()
        self._welcome = loop.create_future()
        self._lost = loop.create_future()
        self._lost.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._writer = writer
        writer.write(encode(HELLO, payload=self.epoch))
        self._carrier = [
            asyncio.create_task(self._read(reader), name="relay-carrier-in"),
            asyncio.create_task(self._write(writer), name="relay-carrier-out"),
        ]
        return await asyncio.shield(self._welcome)

    def detach(self) -> None:
        """Stop using the current carrier (it died or is being replaced); keep every stream."""
        for task in self._carrier:
            task.cancel()
        if self._writer is not None:
            self._carrier_gone()
        self._carrier = []
        self._writer = None
        self.mux.detach()
        self._fail_waiters()

    def _carrier_gone(self) -> None:
        if self._lost_at is None:
            self._lost_at = asyncio.get_running_loop().time()

    def _fail_waiters(self) -> None:
        for fut in (self._welcome, self._bye, self._lost, *self._pongs.values()):
            if fut is not None and not fut.done():
                fut.set_exception(RelayEnded("the relay's carrier ended"))

    async def carrier_lost(self) -> None:
        """Wait until the current carrier ends."""
        if self._lost is not None:
            with contextlib.suppress(RelayEnded):
                await asyncio.shield(self._lost)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(256 * 1024)
                if not data:
                    break
                self.mux.feed(data, self._on_control)
                self._apply_events()
                for conn in self._conns.values():
                    conn.room.set()
                self.kick()
        except (OSError, WireError):
            pass
        self.mux.detach()
        self._carrier_gone()
        self._fail_waiters()

    async def _write(self, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self.mux.wants_output():
                    writer.write(self.mux.output())
                    await writer.drain()
                    self._apply_events()
        except (OSError, RuntimeError):
            self.mux.detach()
            self._carrier_gone()
            self._fail_waiters()

    def kick(self) -> None:
        """Something may have to go to the head."""
        self._wake.set()

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

    def _apply_events(self) -> None:
        events, self.mux.events = self.mux.events, []
        for kind, sid, data in events:
            if kind == "open":
                self._conns[sid] = _Conn(self, sid)
            elif kind == "data":
                conn = self._conns.get(sid)
                if conn is None:
                    self.mux.taken(sid, len(data))
                else:
                    conn.queue.put_nowait(data)
            elif kind == "eof":
                conn = self._conns.get(sid)
                if conn is None:
                    self.mux.took_fin(sid)
                else:
                    conn.queue.put_nowait(None)
            elif kind == "close":
                conn = self._conns.pop(sid, None)
                if conn is not None:
                    conn.close()

    # -- pings and the end ----------------------------------------------------------

    async def ping(self) -> float:
        """One round trip to the head relay and back; returns its seconds (wrap it in a timeout)."""
        if self._writer is None or not self.mux.attached:
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
        if not said and self._writer is not None and self.mux.attached:
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
        for conn in conns:
            conn.close(abort=True)
        if conns:
            await asyncio.wait([c.task for c in conns], timeout=2.0)
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

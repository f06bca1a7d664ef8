"""The blocking side of a paramiko session: tracked threads, and relays between channels and sockets.

Paramiko blocks, so a session runs it in threads: paramiko's transport
thread, one that connects and then reads the session channel, two per
forwarded connection or probe (one per direction, so neither can starve the
other), and one per blocking call the event loop asks for. :class:`SessionThreads`
starts them, refuses new ones once the session ends, and joins them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .logs import get_logger

T = TypeVar("T")

_BUFFER = 64 * 1024


class _Relay:
    """A channel and a local socket copied both ways, one thread per direction.

    An end of file is passed on as a half close (as ssh does); the relay is
    gone once both directions are done, or at once when a write fails or
    :meth:`close` is called.
    """

    def __init__(self, chan: Any, sock: socket.socket, on_done: Callable[[_Relay], None]) -> None:
        self.chan = chan
        self.sock = sock
        self._on_done = on_done
        self._lock = threading.Lock()
        self._halves = 2
        self._closed = False

    def start(self, spawn: Callable[..., threading.Thread | None]) -> bool:
        """Start both directions; False when the session is ending and refused the threads."""
        if spawn(self._to_sock, name="wqs-paramiko-down") is None:
            self.close()
            self._finish()
            return False
        if spawn(self._to_chan, name="wqs-paramiko-up") is None:
            self.close()
            self._half_done()
        return True

    def _to_sock(self) -> None:
        try:
            while data := self.chan.recv(_BUFFER):
                self.sock.sendall(data)
            if self.chan.closed:
                self.close()
            else:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
        finally:
            self._half_done()

    def _to_chan(self) -> None:
        try:
            while data := self.sock.recv(_BUFFER):
                self.chan.sendall(data)
            self.chan.shutdown_write()
        except OSError:
            self.close()
        finally:
            self._half_done()

    def _half_done(self) -> None:
        with self._lock:
            self._halves -= 1
            last = self._halves == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        self.close()
        self.sock.close()
        self._on_done(self)

    def close(self) -> None:
        """Stop both directions (they end by themselves once woken)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self.chan.close()


class SessionThreads:
    """Every thread and relay of one session; safe to use from any thread except where noted."""

    def __init__(self, loop: asyncio.AbstractEventLoop, refused: Callable[[], BaseException]) -> None:
        self._loop = loop
        self._refused = refused
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._relays: set[_Relay] = set()
        self._ending = False

    def spawn(self, target: Callable[..., None], *args: Any, name: str) -> threading.Thread | None:
        """Start a tracked thread; None once the session is ending."""
        with self._lock:
            if self._ending:
                return None
            self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(target=target, args=args, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        return thread

    def adopt(self, thread: threading.Thread) -> None:
        """Track a thread started elsewhere (paramiko's transport) so that it is joined too."""
        with self._lock:
            self._threads.append(thread)

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the event loop's thread."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(fn, *args)

    def call(
        self, fn: Callable[..., T], *args: Any, discard: Callable[[T], None] | None = None
    ) -> asyncio.Future[T]:
        """Run a blocking call in a thread of its own; ``discard`` gets a result nobody awaits."""
        fut: asyncio.Future[T] = self._loop.create_future()

        def settle(result: T | None, error: BaseException | None) -> None:
            if fut.done():
                if error is None and discard is not None:
                    discard(result)  # type: ignore[arg-type]
            elif error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)  # type: ignore[arg-type]

        def run() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:
                self.post(settle, None, exc)
            else:
                self.post(settle, result, None)

        if self.spawn(run, name="wqs-paramiko-call") is None:
            fut.set_exception(self._refused())
        return fut

    def relay(self, chan: Any, sock: socket.socket) -> None:
        """Copy between ``chan`` and ``sock`` until either ends."""
        relay = _Relay(chan, sock, self._relay_done)
        with self._lock:
            if not self._ending:
                self._relays.add(relay)
        relay.start(self.spawn)

    def _relay_done(self, relay: _Relay) -> None:
        with self._lock:
            self._relays.discard(relay)

    def end(self) -> None:
        """Refuse new threads and stop every relay."""
        with self._lock:
            self._ending = True
            relays = list(self._relays)
        for relay in relays:
            relay.close()

    async def join(self, timeout: float) -> None:
        """Wait (in the loop) until every thread has ended, or warn after ``timeout``."""
        deadline = self._loop.time() + timeout
        while True:
            with self._lock:
                alive = [t for t in self._threads if t.is_alive()]
                self._threads = alive
            if not alive:
                return
            if self._loop.time() > deadline:
                get_logger().warning("paramiko.threads_left", threads=[t.name for t in alive])
                return
            await asyncio.sleep(0.005)

"""The head node's side of the relay: a daemon that holds the workers' connections, and the attacher.

Sent over the tunnel's own ssh session and run by the head's ``python3``
(3.6 or later, standard library only; see :mod:`wqsupervisor.relay.program`).
The session runs the *attacher*: it connects to the daemon's unix socket in
``~/.wqsupervisor/relay/`` (0700), starting the daemon first if none answers,
and then only copies bytes between its stdin/stdout and that socket. The
*daemon* (detached: double fork, setsid, no terminal) listens on the tunnel's
``BIND:REMOTE``, holds every worker connection, and multiplexes them over
whichever attacher is current (:class:`Mux`). When the session dies the
attacher dies with it; the daemon waits ``linger`` seconds for the next one,
then closes its workers' connections and exits.
"""

import contextlib
import errno
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from typing import Dict, List, Optional, Set

from .core import Mux
from .wire import BYE, HELLO, PING, PONG, SHUTDOWN, WELCOME, WireError

READ_CHUNK = 64 * 1024
CARRIER_HIGH = 512 * 1024
PROCESS_NAME = b"wqs-relay"


def relay_dir() -> str:
    """``~/.wqsupervisor/relay``: created 0700, refused when another user owns it or may enter it."""
    path = os.path.join(os.path.expanduser("~"), ".wqsupervisor", "relay")
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    st = os.stat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise SystemExit("wqs-relay: %s is not private to this user" % path)
    return path


def socket_path(bind: str, port: int) -> str:
    """The daemon's unix socket for one remote port."""
    return os.path.join(relay_dir(), "%s-%d.sock" % (bind, port))


def _name_process() -> None:
    # The head's holder script reads /proc/PID/comm: this name tells our relay
    # from a foreign program on the port (and from a stale sshd session).
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, PROCESS_NAME, 0, 0, 0)
    except Exception:  # noqa: S110 -- a name is a convenience, not a requirement
        pass


class Daemon:
    """Holds the workers' connections and serves one carrier (attacher) at a time."""

    def __init__(self, bind: str, port: int, path: str, linger: float) -> None:
        self.path = path
        self.linger = linger
        self.listener = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((bind, port))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.control = socket.socket(socket.AF_UNIX)
        with contextlib.suppress(OSError):
            os.unlink(path)
        old = os.umask(0o077)
        try:
            self.control.bind(path)
        finally:
            os.umask(old)
        self.control.listen(4)
        self.control.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.sel.register(self.control, selectors.EVENT_READ, "control")
        self.mux = Mux(opener=True)
        self.socks: Dict[int, socket.socket] = {}
        self.pending: Dict[int, bytearray] = {}
        self.read_done: Set[int] = set()
        self.end_after_write: Set[int] = set()
        self.carrier: Optional[socket.socket] = None
        self.carrier_out = bytearray()
        self.greeted = False
        self.epoch: Optional[bytes] = None
        self.detached_at = time.monotonic()
        self.stopping = False
        self._registered: Dict[int, int] = {}

    # -- the loop ---------------------------------------------------------------

    def run(self) -> None:
        """Serve until shut down or until no carrier came back for ``linger`` seconds."""
        while not self.stopping:
            self._interest()
            timeout: Optional[float] = None
            if self.carrier is None or not self.greeted:
                timeout = max(0.0, self.detached_at + self.linger - time.monotonic())
            for key, mask in self.sel.select(timeout):
                self._dispatch(key.data, key.fileobj, mask)  # type: ignore[arg-type]
            self._apply_events()
            self._pump()
            if (self.carrier is None or not self.greeted) and (
                time.monotonic() >= self.detached_at + self.linger
            ):
                self.stopping = True
        self._close_all()

    def _interest(self) -> None:
        wanted: Dict[int, int] = {}
        for sid in self.socks:
            mask = 0
            if sid not in self.read_done and self.mux.room(sid) > 0:
                mask |= selectors.EVENT_READ
            if self.pending.get(sid):
                mask |= selectors.EVENT_WRITE
            wanted[sid] = mask
        for sid, mask in wanted.items():
            self._set(self.socks[sid], ("sock", sid), mask)
        if self.carrier is not None:
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.carrier_out else 0)
            self._set(self.carrier, "carrier", mask)

    def _set(self, sock: socket.socket, data: object, mask: int) -> None:
        fd = sock.fileno()
        old = self._registered.get(fd, 0)
        if mask == old:
            return
        if old and not mask:
            self.sel.unregister(sock)
        elif not old:
            self.sel.register(sock, mask, data)
        else:
            self.sel.modify(sock, mask, data)
        if mask:
            self._registered[fd] = mask
        else:
            self._registered.pop(fd, None)

    def _forget(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._registered.pop(fd, 0):
            self.sel.unregister(sock)
        sock.close()

    def _dispatch(self, what: object, sock: socket.socket, mask: int) -> None:
        if what == "listen":
            self._accept_worker()
        elif what == "control":
            self._accept_carrier()
        elif what == "carrier":
            if mask & selectors.EVENT_WRITE:
                self._write_carrier()
            if mask & selectors.EVENT_READ and self.carrier is sock:
                self._read_carrier()
        elif isinstance(what, tuple):
            sid = what[1]
            if mask & selectors.EVENT_WRITE:
                self._write_worker(sid)
            if mask & selectors.EVENT_READ and sid in self.socks:
                self._read_worker(sid)

    # -- workers -----------------------------------------------------------------

    def _accept_worker(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sid = self.mux.open()
        self.socks[sid] = conn

    def _read_worker(self, sid: int) -> None:
        sock = self.socks[sid]
        try:
            data = sock.recv(min(READ_CHUNK, self.mux.room(sid)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._worker_gone(sid)
            return
        if data:
            self.mux.local_data(sid, data)
        else:
            self.read_done.add(sid)
            self.mux.local_eof(sid)

    def _write_worker(self, sid: int) -> None:
        buf = self.pending.get(sid)
        sock = self.socks.get(sid)
        if not buf or sock is None:
            return
        try:
            n = sock.send(buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._worker_gone(sid)
            return
        del buf[:n]
        self.mux.taken(sid, n)
        if not buf and sid in self.end_after_write:
            self._end_write(sid)

    def _end_write(self, sid: int) -> None:
        self.end_after_write.discard(sid)
        sock = self.socks.get(sid)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        self.mux.took_fin(sid)

    def _worker_gone(self, sid: int) -> None:
        sock = self.socks.pop(sid, None)
        if sock is not None:
            self._forget(sock)
        self.pending.pop(sid, None)
        self.read_done.discard(sid)
        self.end_after_write.discard(sid)
        self.mux.local_gone(sid)

    def _apply_events(self) -> None:
        events = self.mux.events
        self.mux.events = []
        for kind, sid, data in events:
            if kind == "data":
                if sid in self.socks:
                    self.pending.setdefault(sid, bytearray()).extend(data)
                else:
                    self.mux.taken(sid, len(data))
            elif kind == "eof":
                if self.pending.get(sid):
                    self.end_after_write.add(sid)
                else:
                    self._end_write(sid)
            elif kind == "close":
                sock = self.socks.pop(sid, None)
                if sock is not None:
                    self._forget(sock)
                self.pending.pop(sid, None)
                self.read_done.discard(sid)
                self.end_after_write.discard(sid)

    # -- the carrier ----------------------------------------------------------------

    def _accept_carrier(self) -> None:
        try:
            conn, _ = self.control.accept()
        except OSError:
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            conn.close()
            return
        conn.setblocking(False)
        self._drop_carrier()
        self.carrier = conn
        self.greeted = False
        self.detached_at = time.monotonic()

    def _drop_carrier(self) -> None:
        if self.carrier is not None:
            self._forget(self.carrier)
        self.carrier = None
        self.carrier_out = bytearray()
        self.greeted = False
        self.mux.detach()
        self.detached_at = time.monotonic()

    def _read_carrier(self) -> None:
        assert self.carrier is not None
        try:
            data = self.carrier.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_carrier()
            return
        try:
            self.mux.feed(data, self._on_control)
        except WireError:
            self._drop_carrier()

    def _on_control(self, kind: int, value: int, payload: bytes) -> None:
        if kind == HELLO:
            fresh = self.epoch != payload
            if fresh:
                self.mux.reset()
                self.epoch = payload
            self.greeted = True
            self.mux.attach()
            self.mux.control(WELCOME, 0, ("%s %d" % ("fresh" if fresh else "resumed", os.getpid())).encode())
        elif kind == PING:
            self.mux.control(PONG, value)
        elif kind == SHUTDOWN:
            self.mux.control(BYE)
            self._pump()
            self._flush_carrier()
            self.stopping = True

    def _pump(self) -> None:
        if self.carrier is None or not self.greeted:
            return
        while len(self.carrier_out) < CARRIER_HIGH and self.mux.wants_output():
            self.carrier_out += self.mux.output()
        self._apply_events()

    def _write_carrier(self) -> None:
        if self.carrier is None or not self.carrier_out:
            return
        try:
            n = self.carrier.send(self.carrier_out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop_carrier()
            return
        del self.carrier_out[:n]

    def _flush_carrier(self) -> None:
        deadline = time.monotonic() + 2.0
        while self.carrier is not None and self.carrier_out and time.monotonic() < deadline:
            self._write_carrier()
            if self.carrier_out:
                time.sleep(0.005)

    def _close_all(self) -> None:
        for sock in list(self.socks.values()):
            self._forget(sock)
        self.socks.clear()
        if self.carrier is not None:
            self._forget(self.carrier)
        self._forget(self.listener)
        self._forget(self.control)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


# -- starting the daemon, attaching to it --------------------------------------------------


def spawn(bind: str, port: int, path: str, linger: float) -> str:
    """Start a detached daemon; returns ``ok`` or the error it met while binding."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        words = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            words += chunk
        os.close(r)
        os.waitpid(pid, 0)
        return words.decode(errors="replace").strip() or "error: the relay died while starting"
    os.close(r)
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        try:
            daemon = Daemon(bind, port, path, linger)
        except OSError as exc:
            code = "port_taken" if exc.errno == errno.EADDRINUSE else "error"
            os.write(w, ("%s: %s" % (code, exc)).encode())
            os._exit(1)
        _name_process()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        os.write(w, b"ok")
        os.close(w)
        daemon.run()
    finally:
        os._exit(0)


def attach(path: str) -> socket.socket:
    """A connection to the daemon's unix socket (raises OSError when none answers)."""
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def splice(sock: socket.socket) -> None:
    """Copy stdin to the daemon and the daemon to stdout until either side ends; then exit."""

    def upstream() -> None:
        try:
            while True:
                data = os.read(0, READ_CHUNK)
                if not data:
                    break
                sock.sendall(data)
        except OSError:
            pass
        os._exit(0)

    reader = threading.Thread(target=upstream, daemon=True)
    reader.start()
    try:
        while True:
            data = sock.recv(READ_CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                n = os.write(1, view)
                view = view[n:]
    except OSError:
        pass
    # The relay ended (shut down, or another session took over): this session
    # ends when its client closes it, so the client sees its own close.
    reader.join()
    os._exit(0)


def main(args: List[str]) -> None:
    """``BIND PORT LINGER``: attach to the port's relay, starting it first when none runs."""
    bind, port, linger = args[0], int(args[1]), float(args[2])
    path = socket_path(bind, port)
    for _ in range(5):
        try:
            sock = attach(path)
        except OSError:
            said = spawn(bind, port, path, linger)
            if said.startswith("port_taken"):
                # The same words as ssh's, so the tunnel reclaims or reports the port as it does.
                sys.stderr.write("Error: remote port forwarding failed for listen port %d\n" % port)
                sys.exit(1)
            if said != "ok":
                sys.stderr.write("wqs-relay: %s\n" % said)
                sys.exit(1)
            continue
        splice(sock)
    sys.stderr.write("wqs-relay: cannot reach the relay at %s\n" % path)
    sys.exit(1)

"""The head node's side of the relay: a daemon that holds the workers' connections, and the attacher.

Sent over the tunnel's own ssh session and run by the head's ``python3``
(3.6 or later, standard library only; see :mod:`wqsupervisor.relay.program`).
The session runs the *attacher*: it connects to the daemon's unix socket in
``~/.wqsupervisor/relay/`` (0700), starting the daemon first if none answers,
hands the daemon its stdin and stdout (``SCM_RIGHTS``: the daemon reads and
writes the session's pipes itself, nothing is copied twice) and waits. The
*daemon* (detached: double fork, setsid, no terminal) listens on the tunnel's
``BIND:REMOTE``, holds every worker connection, and multiplexes them over
whichever attacher is current (:class:`Mux`). When the session dies the
attacher dies with it; the daemon waits ``linger`` seconds for the next one,
then closes its workers' connections and exits.

The same program also resumes a compute node's hop to the head (``node``
and ``hop``): on the node, :class:`NodeRelay` holds the worker's connection
and starts the hop's ssh itself, whose session runs the attacher of a
*hop daemon* on the head; that daemon opens one connection to the tunnel's
port per stream the node opens (:class:`Daemon` with ``connect``). When the
hop's ssh or its session dies, the node starts another and both ends replay,
as the tunnel's relay and the agent do.
"""

import collections
import contextlib
import errno
import fcntl
import hashlib
import itertools
import os
import selectors
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Deque, Dict, List, Optional, Set, Tuple

from .core import ACK_DELAY, Chunk, Mux, consume
from .wire import BYE, HELLO, PING, PONG, REFUSED, SHUTDOWN, UNREACHABLE, WELCOME, Decoder, WireError, encode

READ_CHUNK = 256 * 1024
CARRIER_READ = 256 * 1024
CARRIER_HIGH = 1024 * 1024
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031  # fcntl's name for it arrived in Python 3.10
FD_SIZE = struct.calcsize("i")
PROCESS_NAME = b"wqs-relay"
HOP_PROCESS_NAME = b"wqs-hop"
NODE_UP = "wqs-node-relay-up"
HOP_KEEPALIVE = 5.0
HOP_MAX_DELAY = 30.0
HOP_FIRST_TRIES = 3  # a node relay that no hop daemon ever answered gives up after this many sessions

# What a session runs to start this program (its text follows on stdin): reads exactly N bytes
# with os.read (a buffered read could swallow the frames that follow) and runs them, with the
# text itself as SOURCE (a node relay sends it on to the head).
BOOTSTRAP = (
    "import os,sys\n"
    "n=int(sys.argv[1])\n"
    "b=b''\n"
    "while len(b)<n:\n"
    " c=os.read(0,n-len(b))\n"
    " if not c:\n"
    "  sys.exit(3)\n"
    " b+=c\n"
    "exec(compile(b,'wqs-relay','exec'),{'__name__':'wqs_relay','SOURCE':b})\n"
)


def relay_dir() -> str:
    """``~/.wqsupervisor/relay``: created 0700, refused when another user owns it or may enter it."""
    path = os.path.join(os.path.expanduser("~"), ".wqsupervisor", "relay")
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    st = os.stat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise SystemExit("wqs-relay: %s is not private to this user" % path)
    return path


def socket_path(bind: str, port: int, role: str = "") -> str:
    """The daemon's unix socket for one remote port of this host.

    Login nodes often share the home directory, where the sockets live: the
    relay of one login node must not find (nor unlink) another's socket, so
    the name holds a digest of the hostname and the network namespace (which
    tells apart hosts that share a hostname, as containers do), with the bind
    address and the protocol's version ("v2": an attacher hands over its
    pipes). It stays short: a unix socket's path has at most 107 bytes.
    ``role`` names a hop daemon (``hop KEY``: one per node relay) apart from the tunnel's relay.
    """
    try:
        netns = os.readlink("/proc/self/ns/net")
    except OSError:
        netns = ""
    key = " ".join((socket.gethostname(), netns, bind, "v2") + ((role,) if role else ()))
    return os.path.join(relay_dir(), "%s-%d.sock" % (hashlib.sha256(key.encode()).hexdigest()[:10], port))


def _name_process(name: bytes = PROCESS_NAME) -> None:
    # The head's holder script reads /proc/PID/comm: this name tells our relay
    # from a foreign program on the port (and from a stale sshd session).
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name, 0, 0, 0)
    except Exception:  # noqa: S110 -- a name is a convenience, not a requirement
        pass


class Carrier:
    """The current session's stdin and stdout, and the attacher's socket (None: our own ssh's pipes)."""

    def __init__(self, conn: Optional[socket.socket], rfd: int, wfd: int) -> None:
        self.conn = conn  # closed when we let go: the attacher then exits, and its session ends
        self.rfd = rfd
        self.wfd = wfd
        self.out: Deque[Chunk] = collections.deque()
        self.out_bytes = 0
        for fd in (rfd, wfd):
            os.set_blocking(fd, False)
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)

    def write(self) -> bool:
        """Write what is queued; False when the session is gone."""
        while self.out:
            try:
                n = os.writev(self.wfd, list(itertools.islice(self.out, 64)))
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            self.out_bytes -= n
            consume(self.out, n)
        return True

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.conn is not None:
            self.conn.close()

    def fds(self) -> Tuple[int, ...]:
        return (self.rfd, self.wfd) + ((self.conn.fileno(),) if self.conn is not None else ())


def _receive_fds(conn: socket.socket) -> Optional[Tuple[int, int]]:
    """The two descriptors an attacher sends (its stdin and stdout), or None."""
    conn.settimeout(5)
    try:
        _msg, ancillary, _flags, _addr = conn.recvmsg(1, socket.CMSG_LEN(2 * FD_SIZE))
    except OSError:
        return None
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = struct.unpack("%di" % (len(data) // FD_SIZE), data[: len(data) - len(data) % FD_SIZE])
            if len(fds) == 2:
                return fds[0], fds[1]
            for fd in fds:
                os.close(fd)
    return None


class Daemon:
    """Holds the local connections of one relay end and serves one carrier (a session's pipes) at a time.

    ``listen``: accept the local connections there (the workers', on the tunnel's port), each a new
    stream; ``connect``: open a local connection there for each stream the other end opens (a hop
    daemon, to the tunnel's port). ``path``: the unix socket attachers hand their sessions over on.
    """

    def __init__(
        self,
        path: Optional[str],
        linger: Optional[float],
        listen: Optional[Tuple[str, int]] = None,
        connect: Optional[Tuple[str, int]] = None,
    ) -> None:
        self.path = path
        self.linger = linger  # None: wait for a carrier for ever
        self.target = connect
        self.sel = selectors.DefaultSelector()
        self.listener: Optional[socket.socket] = None
        if listen is not None:
            bind, port = listen
            self.listener = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((bind, port))
            self.listener.listen(128)
            self.listener.setblocking(False)
            self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        self.control: Optional[socket.socket] = None
        if path is not None:
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
            self.sel.register(self.control, selectors.EVENT_READ, "control")
        self.mux = Mux(opener=connect is None)
        self.socks: Dict[int, socket.socket] = {}
        self.pending: Dict[int, Deque[Chunk]] = {}
        self.read_done: Set[int] = set()
        self.end_after_write: Set[int] = set()
        self.carrier: Optional[Carrier] = None
        self.candidate: Optional[Carrier] = None  # another agent's session, until its HELLO is judged
        self.candidate_bytes = b""
        self.greeted = False
        self.epoch: Optional[bytes] = None
        self.owner = b""
        self.heard_at = time.monotonic()
        self.silence = 20.0  # the current agent is gone when its carrier said nothing this long
        self.detached_at = time.monotonic()
        self.ack_at: Optional[float] = None
        self.stopping = False
        self._registered: Dict[int, int] = {}
        self._dirty: Set[int] = set()  # worker sockets whose selector interest may have changed

    # -- the loop ---------------------------------------------------------------

    def run(self) -> None:
        """Serve until shut down or until no carrier came back for ``linger`` seconds."""
        while not self.stopping:
            self._interest()
            for key, mask in self.sel.select(self._timeout(time.monotonic())):
                self._dispatch(key.data, key.fd, mask)
            if self.ack_at is not None and time.monotonic() >= self.ack_at:
                self.mux.flush_acks()
            self._apply_events()
            self._pump()
            self._tick(time.monotonic())
        self._close_all()

    def _timeout(self, now: float) -> Optional[float]:
        """How long the loop may wait for I/O."""
        if self.carrier is None or not self.greeted:
            return None if self.linger is None else max(0.0, self.detached_at + self.linger - now)
        if self.ack_at is not None:
            return max(0.0, self.ack_at - now)
        return None

    def _tick(self, now: float) -> None:
        """What is due now that no I/O brings: the end after ``linger`` without a carrier."""
        if (
            (self.carrier is None or not self.greeted)
            and self.linger is not None
            and now >= self.detached_at + self.linger
        ):
            self.stopping = True

    def _interest(self) -> None:
        dirty = self._dirty | self.mux.room_changed
        self._dirty = set()
        self.mux.room_changed.clear()
        for sid in dirty:
            sock = self.socks.get(sid)
            if sock is None:
                continue
            mask = 0
            if sid not in self.read_done and self.mux.room(sid) > 0:
                mask |= selectors.EVENT_READ
            if self.pending.get(sid):
                mask |= selectors.EVENT_WRITE
            self._set(sock.fileno(), ("sock", sid), mask)
        if self.candidate is not None:
            self._set(self.candidate.rfd, "candidate", selectors.EVENT_READ)
        carrier = self.carrier
        if carrier is not None:
            self._set(carrier.rfd, "carrier", selectors.EVENT_READ)
            self._set(carrier.wfd, "carrier-out", selectors.EVENT_WRITE if carrier.out else 0)
            if carrier.conn is not None:
                self._set(carrier.conn.fileno(), "attacher", selectors.EVENT_READ)

    def _set(self, fd: int, data: object, mask: int) -> None:
        old = self._registered.get(fd, 0)
        if mask == old:
            return
        if old and not mask:
            self.sel.unregister(fd)
        elif not old:
            self.sel.register(fd, mask, data)
        else:
            self.sel.modify(fd, mask, data)
        if mask:
            self._registered[fd] = mask
        else:
            self._registered.pop(fd, None)

    def _unregister(self, fd: int) -> None:
        if self._registered.pop(fd, 0):
            self.sel.unregister(fd)

    def _forget(self, sock: socket.socket) -> None:
        self._unregister(sock.fileno())
        sock.close()

    def _dispatch(self, what: object, fd: int, mask: int) -> None:
        if what == "listen":
            self._accept_worker()
        elif what == "control":
            self._accept_carrier()
        elif what == "candidate":
            if self.candidate is not None and fd == self.candidate.rfd:
                self._judge_candidate()
        elif what in ("carrier", "carrier-out", "attacher"):
            carrier = self.carrier
            # An event of this batch may be for a carrier another one already dropped.
            if carrier is None or fd not in carrier.fds():
                return
            if what == "carrier":
                self._read_carrier()
            elif what == "carrier-out":
                if not carrier.write():
                    self._drop_carrier()
            else:
                # The attacher only ever waits: readable means it is gone.
                self._drop_carrier()
        elif isinstance(what, tuple):
            sid = what[1]
            if mask & selectors.EVENT_WRITE:
                self._write_worker(sid)
            if mask & selectors.EVENT_READ and sid in self.socks:
                self._read_worker(sid)

    # -- workers -----------------------------------------------------------------

    def _accept_worker(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        sid = self.mux.open()
        self._hold(sid, conn)

    def _hold(self, sid: int, conn: socket.socket) -> None:
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socks[sid] = conn
        self._dirty.add(sid)

    def _connect(self, sid: int) -> None:
        """The other end opened stream ``sid``: its local connection (refused: the stream ends)."""
        assert self.target is not None
        try:
            # On this host's loopback (the tunnel's port): it answers at once or not at all.
            conn = socket.create_connection(self.target, timeout=3)
        except OSError:
            self.mux.local_gone(sid)
            self.mux.control(UNREACHABLE, sid)  # a node relay with other heads moves on after a while
            return
        self._hold(sid, conn)

    def _read_worker(self, sid: int) -> None:
        sock = self.socks[sid]
        self._dirty.add(sid)
        try:
            data = sock.recv(min(READ_CHUNK, self.mux.room(sid)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sid)
            return
        if data:
            self.mux.local_data(sid, data)
        else:
            self.read_done.add(sid)
            self.mux.local_eof(sid)

    def _write_worker(self, sid: int) -> None:
        chunks = self.pending.get(sid)
        sock = self.socks.get(sid)
        if not chunks or sock is None:
            return
        self._dirty.add(sid)
        try:
            n = sock.sendmsg(list(itertools.islice(chunks, 64)))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sid)
            return
        self.mux.taken(sid, n)
        consume(chunks, n)
        if not chunks and sid in self.end_after_write:
            self._end_write(sid)

    def _end_write(self, sid: int) -> None:
        self.end_after_write.discard(sid)
        sock = self.socks.get(sid)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        self.mux.took_fin(sid)

    def _drop(self, sid: int) -> None:
        """Forget the worker socket of stream ``sid``; its stream ends unless it already had."""
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
            if kind == "open":
                self._connect(sid)
            elif kind == "data":
                if sid in self.socks:
                    self.pending.setdefault(sid, collections.deque()).append(data)
                    self._write_worker(sid)  # at once: most writes fit, and a select turn is a wait
                else:
                    self.mux.taken(sid, len(data))
            elif kind == "eof":
                if self.pending.get(sid):
                    self.end_after_write.add(sid)
                else:
                    self._end_write(sid)
            elif kind == "close":
                self._drop(sid)

    # -- the carrier ----------------------------------------------------------------

    def _accept_carrier(self) -> None:
        assert self.control is not None
        try:
            conn, _ = self.control.accept()
        except OSError:
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        fds = _receive_fds(conn) if struct.unpack("3i", creds)[1] == os.getuid() else None
        if fds is None:
            conn.close()
            return
        conn.setblocking(False)
        if self.carrier is not None and self.greeted:
            # Ours again (a restart), or another agent's: its HELLO decides (_judge_candidate).
            self._drop_candidate()
            self.candidate = Carrier(conn, fds[0], fds[1])
            self.candidate_bytes = b""
            return
        self._drop_carrier()
        self.carrier = Carrier(conn, fds[0], fds[1])
        self.greeted = False
        self.detached_at = time.monotonic()

    def _drop_candidate(self) -> None:
        if self.candidate is not None:
            self._unregister(self.candidate.rfd)
            self.candidate.close()
        self.candidate = None

    def _judge_candidate(self) -> None:
        """Take the new session when it is our agent's, or when ours went silent; refuse it otherwise."""
        candidate = self.candidate
        assert candidate is not None
        try:
            data = os.read(candidate.rfd, CARRIER_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_candidate()
            return
        self.candidate_bytes += data
        try:
            frames = Decoder().feed(self.candidate_bytes)
        except WireError:
            self._drop_candidate()
            return
        if not frames:
            return
        kind, _sid, _value, payload = frames[0]
        if kind != HELLO:
            self._drop_candidate()
            return
        ours = bytes(payload).split(b" ", 1)[0] == self.epoch
        if ours or time.monotonic() - self.heard_at > self.silence:
            early = self.candidate_bytes
            self._unregister(candidate.rfd)
            self.candidate = None
            self._drop_carrier()
            self.carrier = candidate
            self.greeted = False
            self.detached_at = self.heard_at = time.monotonic()
            try:
                self.mux.feed(early, self._on_control)
            except WireError:
                self._drop_carrier()
            return
        # A live agent holds this relay: say whose, and let the other session end.
        with contextlib.suppress(OSError):
            os.set_blocking(candidate.wfd, True)
            os.write(candidate.wfd, encode(REFUSED, payload=self.owner))
        self._drop_candidate()

    def _drop_carrier(self) -> None:
        if self.carrier is not None:
            for fd in self.carrier.fds():
                self._unregister(fd)
            self.carrier.close()
        self.carrier = None
        self.greeted = False
        self.ack_at = None
        self.mux.detach()
        self.detached_at = time.monotonic()

    def _read_carrier(self) -> None:
        assert self.carrier is not None
        try:
            data = os.read(self.carrier.rfd, CARRIER_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_carrier()
            return
        self.heard_at = time.monotonic()
        try:
            self.mux.feed(data, self._on_control)
        except WireError:
            self._drop_carrier()

    def _on_control(self, kind: int, value: int, payload: bytes) -> None:
        if kind == HELLO:
            words = payload.split(b" ", 1)
            fresh = self.epoch != words[0]
            if fresh:
                self.mux.reset()
                self.epoch = words[0]
            self.owner = words[1] if len(words) > 1 else b""
            with contextlib.suppress(IndexError, ValueError):
                self.silence = 3 * float(self.owner.split()[3]) + 5
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
        carrier = self.carrier
        if carrier is None or not self.greeted:
            return
        while carrier.out_bytes < CARRIER_HIGH and self.mux.wants_output():
            for part in self.mux.output_parts():
                carrier.out.append(part)
                carrier.out_bytes += len(part)
        self._apply_events()
        if carrier.out and not carrier.write():
            self._drop_carrier()
            return
        if self.mux.owes_acks():
            if self.ack_at is None:
                self.ack_at = time.monotonic() + ACK_DELAY
        else:
            self.ack_at = None

    def _flush_carrier(self) -> None:
        deadline = time.monotonic() + 2.0
        while self.carrier is not None and self.carrier.out and time.monotonic() < deadline:
            if not self.carrier.write():
                break
            if self.carrier.out:
                time.sleep(0.005)

    def _close_all(self) -> None:
        self._drop_candidate()
        for sock in list(self.socks.values()):
            self._forget(sock)
        self.socks.clear()
        if self.carrier is not None:
            self.carrier.close()
        for held in (self.listener, self.control):
            if held is not None:
                self._forget(held)
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _log(text: str) -> None:
    sys.stderr.write("%s wqs-node-relay[%d]: %s\n" % (time.strftime("%H:%M:%S"), os.getpid(), text))
    sys.stderr.flush()


class NodeRelay(Daemon):
    """A compute node's end of a resumable hop: holds the worker's connections, runs the hop's ssh.

    It listens on the node's ``127.0.0.1:port`` for the worker. Its carrier
    is an ssh to a head node (``ssh_argv``, then one of ``heads``) whose
    remote command receives this very program (``source``) and runs the
    attacher of this relay's hop daemon there, which connects each stream to
    the tunnel's ``remote_port``. When that ssh ends, for whatever reason,
    another starts after a backoff (1 s doubling to 30 s while no hop daemon
    answers, 1 s again once one has) and both ends replay what the other has
    not acknowledged: the worker's connection carries on. The hop daemon
    lingers ``linger`` seconds without us; SIGTERM (or SIGINT, SIGHUP) ends
    it at once and then this relay.

    With several heads it moves to the next one, as the plain hop does, when
    ssh cannot reach the current one (status 255 before a hop daemon
    answered) or two sessions in a row there got no answer, and when the
    tunnel's port there refused the worker for ``refused_move`` seconds and
    none of its connections lasted meanwhile (the tunnel left that head
    while its sshd still answers). The
    next head's hop daemon is a new one: the worker's connections end there
    and the worker connects again, through the head the tunnel is on.

    It says :data:`NODE_UP` and its port on stdout once the first hop daemon
    answered; when none answered :data:`HOP_FIRST_TRIES` sessions in a row on
    every head (no ``python`` on the head, say), it gives up
    (:attr:`gave_up`), and the launcher falls back to a plain hop.
    """

    def __init__(
        self,
        port: int,
        remote_port: int,
        linger: float,
        ssh_argv: List[str],
        heads: List[str],
        source: bytes,
        python: str,
        refused_move: float = 10.0,
    ) -> None:
        super().__init__(None, None, listen=("127.0.0.1", port))
        assert self.listener is not None and heads
        self.port = self.listener.getsockname()[1]
        self.key = os.urandom(12).hex()
        self.hello = self.key.encode()
        inner = "exec %s -c %s %d hop 127.0.0.1 %d %g %s" % (
            shlex.quote(python),
            shlex.quote(BOOTSTRAP),
            len(source),
            remote_port,
            linger,
            self.key,
        )
        self.command = "exec sh -c %s" % shlex.quote(inner)
        self.ssh_argv = list(ssh_argv)
        self.heads = list(heads)
        self.at = 0  # the head the hop goes to
        self.tried: Set[int] = set()  # heads tried since a hop daemon last answered
        self.fails_here = 0  # sessions in a row on this head that no hop daemon answered
        self.refused_move = refused_move
        self.refused_since: Optional[float] = None
        self.refused_last = 0.0
        self.opened: Dict[int, float] = {}  # when each worker connection came
        self.source = source
        self.proc: "Optional[subprocess.Popen[bytes]]" = None  # the current hop's ssh
        self.ended: "List[subprocess.Popen[bytes]]" = []  # earlier ones, to reap
        self.next_start = time.monotonic()
        self.delay = 1.0
        self.started_at = 0.0
        self.welcomed = False  # a hop daemon answered before: a fresh one lost our streams
        self.failures = 0  # sessions that ended before any hop daemon answered
        self.gave_up = False
        self.terminating: Optional[float] = None  # when SIGTERM came: the deadline of the goodbye
        self.wake_r, wake_w = os.pipe()
        for fd in (self.wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: None)  # the wakeup fd tells the loop
        self.sel.register(self.wake_r, selectors.EVENT_READ, "signal")

    @property
    def head(self) -> str:
        return self.heads[self.at]

    def _hold(self, sid: int, conn: socket.socket) -> None:
        self.opened[sid] = time.monotonic()
        super()._hold(sid, conn)

    def _drop(self, sid: int) -> None:
        self.opened.pop(sid, None)
        super()._drop(sid)

    def _through(self, now: float) -> bool:
        """Some worker connection got through: the head's side has not ended it in 3 s."""
        for sid, since in self.opened.items():
            stream = self.mux.streams.get(sid)
            if now - since > 3.0 and stream is not None and stream.fin_at is None:
                return True
        return False

    def _dispatch(self, what: object, fd: int, mask: int) -> None:
        if what != "signal":
            super()._dispatch(what, fd, mask)
            return
        with contextlib.suppress(OSError):
            os.read(self.wake_r, 64)
        if self.terminating is None:
            self.terminating = time.monotonic() + 2.0
            if self.carrier is not None and self.greeted:
                self.mux.control(SHUTDOWN)  # the hop daemon closes its connections and says BYE
            else:
                self.stopping = True

    def _timeout(self, now: float) -> Optional[float]:
        waits = [super()._timeout(now)]
        if self.carrier is None:
            waits.append(max(0.0, self.next_start - now))
        if self.ended or self.terminating is not None or self.refused_since is not None:
            waits.append(0.2)
        due = [w for w in waits if w is not None]
        return min(due) if due else None

    def _tick(self, now: float) -> None:
        self.ended = [proc for proc in self.ended if proc.poll() is None]
        if self.terminating is not None:
            if now >= self.terminating or self.carrier is None:
                self.stopping = True
            return
        if self.refused_since is not None:
            if self._through(now) or now - self.refused_last > 30.0:
                self.refused_since = None  # a connection got through (or the refusals are long past)
            elif self.refused_last - self.refused_since >= self.refused_move and len(self.heads) > 1:
                _log(
                    "the tunnel's port on %s refused the worker for %ds: moving on"
                    % (self.head, self.refused_move)
                )
                self.refused_since = None
                if self.carrier is not None and self.greeted:
                    self.mux.control(SHUTDOWN)  # that hop daemon need not wait for us
                    self._pump()
                    self._flush_carrier()
                self._leave(now)
        if self.carrier is None and now >= self.next_start:
            self._start_carrier(now)

    def _leave(self, now: float) -> None:
        """Go to the next head at once (its hop daemon is a new one: the worker connects again)."""
        moving, self.proc = self.proc, None
        super()._drop_carrier()
        if moving is not None:
            with contextlib.suppress(OSError):
                moving.terminate()
            self.ended.append(moving)
        self.at = (self.at + 1) % len(self.heads)
        self.fails_here = 0
        self.tried = set()
        self.next_start = now

    def _start_carrier(self, now: float) -> None:
        to_ssh, from_ssh = os.pipe(), os.pipe()
        argv = [*self.ssh_argv, self.head, self.command]
        try:
            proc = subprocess.Popen(argv, stdin=to_ssh[0], stdout=from_ssh[1], stderr=None)
        except OSError as exc:
            for fd in to_ssh + from_ssh:
                os.close(fd)
            self._again(now, "cannot run ssh: %s" % exc, False, None)
            return
        finally:
            with contextlib.suppress(OSError):
                os.close(to_ssh[0])
                os.close(from_ssh[1])
        self.proc, self.started_at = proc, now
        self.tried.add(self.at)
        self.carrier = Carrier(None, from_ssh[0], to_ssh[1])
        self.greeted = False
        owner = "%s %d %d %g" % (socket.gethostname(), os.getpid(), int(time.time()), HOP_KEEPALIVE)
        for part in (self.source, encode(HELLO, payload=self.hello + b" " + owner.encode())):
            self.carrier.out.append(part)
            self.carrier.out_bytes += len(part)
        if not self.carrier.write():
            self._drop_carrier()

    def _drop_carrier(self) -> None:
        answered = self.greeted
        super()._drop_carrier()
        proc, self.proc = self.proc, None
        if proc is None:
            return
        status: Optional[int] = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            status = proc.wait(0.2)  # it ends with its session: its status says why
        if status is None:
            with contextlib.suppress(OSError):
                proc.terminate()
            self.ended.append(proc)
        if self.terminating is None:
            now = time.monotonic()
            why = "the hop's ssh to %s ended after %ds" % (self.head, now - self.started_at)
            self._again(now, why, answered, status)

    def _again(self, now: float, why: str, answered: bool, status: Optional[int]) -> None:
        """A session ended (``answered``: a hop daemon had answered it; ``status``: ssh's exit status)."""
        if not answered:
            self.fails_here += 1
        if not self.welcomed:
            self.failures += 1
            if self.failures >= HOP_FIRST_TRIES * len(self.heads):
                _log("%s; no hop daemon answered %d sessions in a row: giving up" % (why, self.failures))
                self.gave_up = self.stopping = True
                return
        if len(self.heads) > 1 and not answered and (status == 255 or self.fails_here >= 2):
            failed = self.head
            self.at = (self.at + 1) % len(self.heads)
            self.fails_here = 0
            if self.at not in self.tried:
                _log("%s; trying %s" % (why, self.head))
                self.next_start = now
                return
            self.tried = set()  # every head tried: the next round after the backoff
            why += "; every head tried since %s" % failed
        self.next_start = now + self.delay
        _log("%s; again in %gs" % (why, self.delay))
        self.delay = min(HOP_MAX_DELAY, self.delay * 2)

    def _on_control(self, kind: int, value: int, payload: bytes) -> None:
        if kind == WELCOME:
            fresh = not payload.startswith(b"resumed")
            if fresh and self.welcomed:
                _log("the hop daemon on %s is a new one: the worker's connections end" % self.head)
                self.mux.reset()
            elif not fresh:
                _log("hop resumed")
            if not self.welcomed:
                sys.stdout.write("%s %d\n" % (NODE_UP, self.port))
                sys.stdout.flush()
            self.welcomed = self.greeted = True
            self.delay = 1.0  # the head answered: the next loss is retried soon again
            self.fails_here = 0
            self.tried = set()
            self.mux.attach()
        elif kind == UNREACHABLE:
            if value in self.socks:
                self._drop(value)  # closed at once, as ssh -L closes a connection its forward refused
            now = time.monotonic()
            if self.refused_since is None:
                self.refused_since = now
            self.refused_last = now
        elif kind == BYE:
            self.stopping = True

    def _close_all(self) -> None:
        super()._close_all()
        for proc in [self.proc, *self.ended]:
            if proc is None:
                continue
            with contextlib.suppress(OSError):
                proc.terminate()
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_node(args: List[str]) -> None:
    """``PORT REMOTE_PORT LINGER HEAD_PYTHON REFUSED_MOVE HEADS SSH-ARGV...``: a node relay in the
    foreground (:class:`NodeRelay`); HEADS is one word per head node, space-separated.

    Run through :data:`BOOTSTRAP`, which gives the program its own text to send to the head.
    """
    source = globals().get("SOURCE")
    if not isinstance(source, bytes):
        raise SystemExit("wqs-relay: run the node relay through its bootstrap (it sends itself to the head)")
    port, remote, linger, python, refused_move, heads = args[:6]
    relay = NodeRelay(
        int(port), int(remote), float(linger), args[6:], heads.split(), source, python, float(refused_move)
    )
    relay.run()
    if relay.gave_up:
        sys.exit(1)


# -- starting the daemon, attaching to it --------------------------------------------------


Address = Optional[Tuple[str, int]]


def spawn(path: str, linger: float, listen: Address = None, connect: Address = None) -> str:
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
            daemon = Daemon(path, linger, listen=listen, connect=connect)
        except OSError as exc:
            code = "port_taken" if exc.errno == errno.EADDRINUSE else "error"
            os.write(w, ("%s: %s" % (code, exc)).encode())
            os._exit(1)
        _name_process(PROCESS_NAME if connect is None else HOP_PROCESS_NAME)
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


def hand_over(sock: socket.socket) -> None:
    """Give the daemon this session's stdin and stdout, then wait until it lets go of them; then exit.

    The daemon reads and writes the session's pipes itself (no copy through
    this process). This process holds the session open: it exits when the
    daemon closes ``sock`` (another session took over, or the relay ended).
    """
    try:
        sock.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("2i", 0, 1))])
    except OSError:
        os._exit(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass
    os._exit(0)


def main(args: List[str]) -> None:
    """``BIND PORT LINGER``: attach to the port's relay, starting it first when none runs.

    ``hop BIND PORT LINGER KEY``: the same for the hop daemon of node relay KEY, which connects
    to ``BIND:PORT``; ``node ...``: a node relay (:func:`run_node`).
    """
    if args and args[0] == "node":
        run_node(args[1:])
        return
    hop = bool(args) and args[0] == "hop"
    if hop:
        args = args[1:]
    bind, port, linger = args[0], int(args[1]), float(args[2])
    if hop:
        path = socket_path(bind, port, "hop " + args[3])
        where = {"connect": (bind, port)}
    else:
        path = socket_path(bind, port)
        where = {"listen": (bind, port)}
    for _ in range(5):
        try:
            sock = attach(path)
        except OSError:
            said = spawn(path, linger, **where)
            if said.startswith("port_taken"):
                # The same words as ssh's, so the tunnel reclaims or reports the port as it does.
                sys.stderr.write("Error: remote port forwarding failed for listen port %d\n" % port)
                sys.exit(1)
            if said != "ok":
                sys.stderr.write("wqs-relay: %s\n" % said)
                sys.exit(1)
            continue
        hand_over(sock)
    sys.stderr.write("wqs-relay: cannot reach the relay at %s\n" % path)
    sys.exit(1)

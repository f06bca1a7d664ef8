"""The tunnel's own TCP connection: opened here, tuned, read with TCP_INFO, handed to ssh.

Owning the socket lets the supervisor set what ssh cannot:

* ``TCP_RTO_MAX_MS`` (Linux 6.15+) caps the retransmission backoff at 1 s, so
  a session that survives an outage answers within about a second of the
  path's return instead of after TCP's next exponential retry (9 s after a
  20 s outage, measured);
* ``TCP_USER_TIMEOUT`` of 10 minutes keeps the kernel from aborting the
  connection during a long outage (with a 1 s cap, the default 15 retries
  would give up after about 15 s);
* ``TCP_NODELAY`` from the first byte; and ``TCP_INFO`` (RTT, retransmissions,
  unacknowledged data) can be read at any time, with no probe traffic.

ssh gets the connected socket through ``ProxyUseFdpass``: its ProxyCommand is
a tiny helper that fetches the descriptor from the engine over a unix socket
in the run directory (0700) and passes it on to ssh with SCM_RIGHTS.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import shlex
import socket
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from .protocol.snapshot import TcpSnapshot
from .session import FailureKind, SessionFailure

USER_TIMEOUT_MS = 10 * 60 * 1000
RTO_MAX_MS = 1000
_TCP_RTO_MAX_MS = getattr(socket, "TCP_RTO_MAX_MS", 44)
_TCP_INFO_FORMAT = "8B24I"

_HELPER = """\
import socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
    s.connect(sys.argv[1])
    _, fds, _, _ = socket.recv_fds(s, 1, 1)
if not fds:
    sys.exit("wqsupervisor: no connection was handed over")
socket.send_fds(socket.socket(fileno=1), [b"\\0"], fds)
"""


def fd_passing_supported() -> bool:
    """True where the supervisor can hand a socket to ssh (POSIX with SCM_RIGHTS)."""
    return hasattr(socket, "send_fds") and sys.platform != "win32"


@functools.cache
def rto_cap_supported() -> bool:
    """True when this kernel lets a socket cap its retransmission backoff (Linux 6.15+)."""
    if not sys.platform.startswith("linux"):
        return False
    with socket.socket() as s:
        try:
            s.setsockopt(socket.IPPROTO_TCP, _TCP_RTO_MAX_MS, RTO_MAX_MS)
        except OSError:
            return False
    return True


def set_rto_cap(sock: socket.socket, on: bool) -> None:
    """Cap ``sock``'s retransmission backoff at 1 s, or give it back the kernel's 120 s."""
    sock.setsockopt(socket.IPPROTO_TCP, _TCP_RTO_MAX_MS, RTO_MAX_MS if on else 120_000)


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    if rto_cap_supported():
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_RTO_MAX_MS, RTO_MAX_MS)


class ConnectFailed(OSError):
    """The supervisor's own TCP connection to the head's sshd failed."""

    def __init__(self, kind: FailureKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail

    def failure(self, dest: str) -> SessionFailure:
        """This failure worded for the user, ``dest`` being the head node as given."""
        if self.kind is FailureKind.RESOLVE:
            return SessionFailure.unresolved(dest, self.detail)
        if self.kind is FailureKind.REFUSED:
            return SessionFailure.refused(dest, self.detail)
        return SessionFailure.network(dest, self.detail)


async def open_connection(host: str, port: int, timeout: float) -> socket.socket:
    """Connect to ``host:port`` with the tunnel's socket options; raises :class:`ConnectFailed`."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), timeout
        )
    except (socket.gaierror, TimeoutError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else "name lookup timed out"
        raise ConnectFailed(FailureKind.RESOLVE, f"Could not resolve hostname {host}: {reason}") from None
    last: ConnectFailed | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            _tune(sock)
            await asyncio.wait_for(loop.sock_connect(sock, addr), timeout)
            return sock
        except TimeoutError:
            sock.close()
            last = ConnectFailed(
                FailureKind.NETWORK, f"connect to host {host} port {port}: Connection timed out"
            )
        except OSError as exc:
            sock.close()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            refused = exc.errno == errno.ECONNREFUSED
            last = ConnectFailed(
                FailureKind.REFUSED if refused else FailureKind.NETWORK,
                f"connect to host {host} port {port}: {reason}",
            )
    raise last or ConnectFailed(FailureKind.NETWORK, f"connect to host {host} port {port}: no address")


def tcp_info(sock: socket.socket) -> TcpSnapshot | None:
    """Read ``TCP_INFO`` of ``sock`` (None where the platform has none)."""
    size = struct.calcsize(_TCP_INFO_FORMAT)
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, size)
    except (OSError, AttributeError):
        return None
    if len(raw) < size:
        return None
    v = struct.unpack(_TCP_INFO_FORMAT, raw[:size])
    return TcpSnapshot(
        rtt_ms=v[8 + 15] / 1000,
        retransmits=v[2],
        total_retrans=v[8 + 23],
        unacked=v[8 + 4],
        backoff=v[4],
        last_ack_recv_ms=v[8 + 12],
        rto_ms=v[8 + 0] / 1000,
    )


class Handoff:
    """Hands connected sockets to ssh through ``ProxyUseFdpass`` and a helper in ``rundir``."""

    def __init__(self, rundir: str, name: str) -> None:
        self._helper = Path(rundir) / "fdpass.py"
        if not self._helper.exists():
            self._helper.write_text(_HELPER)
        self._path = str(Path(rundir) / f"fd-{name}.sock")

    def ssh_options(self) -> list[str]:
        """The ssh options that make it take the connection from the helper."""
        command = " ".join(
            shlex.quote(p) for p in (sys.executable, "-I", "-S", str(self._helper), self._path)
        )
        # ssh runs it as "exec COMMAND" itself.
        return ["-o", "ProxyUseFdpass=yes", "-o", "ProxyCommand=" + command.replace("%", "%%")]

    @contextlib.asynccontextmanager
    async def offer(self, sock: socket.socket, timeout: float) -> AsyncIterator[asyncio.Task[bool]]:
        """Listen for the helper while the block starts ssh; the task says whether it was handed over."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.setblocking(False)
        old = os.umask(0o177)
        try:
            server.bind(self._path)
        finally:
            os.umask(old)
        server.listen(1)
        task = asyncio.create_task(self._serve(server, sock, timeout))
        try:
            yield task
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)

    @staticmethod
    async def _serve(server: socket.socket, sock: socket.socket, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        conn, _ = await asyncio.wait_for(loop.sock_accept(server), timeout)
        with conn:
            conn.setblocking(True)
            socket.send_fds(conn, [b"\0"], [sock.fileno()])
        return True

"""The network paths between a master and its workers, for the bulk, latency and concurrency figures.

Every path leads to one :class:`Server` (a sink that counts bytes, an echo
for round trips, and a ``queue_status`` answer so the supervisor accepts it
as a master) and yields the 127.0.0.1 port a client connects to:

* ``direct`` -- loopback TCP to the server, the limit of this machine;
* ``ssh -R``, ``ssh -R aes128-gcm``, ``ssh -R chacha20-poly1305`` -- the HOWTO's
  ``ssh -N -R`` to the loopback :class:`~wqsupervisor.harness.sandbox.HeadNode`, with
  the client's default cipher or one forced with ``-o Ciphers=``;
* ``two-hop`` -- the HOWTO's chain: that ``ssh -N -R`` on the campus side and a
  node's ``ssh -N -L`` to the head's remote port;
* ``paramiko`` -- the in-process backend's reverse forward
  (:class:`~wqsupervisor.paramiko_backend.ParamikoSession`);
* ``wqsupervisor`` -- the supervised tunnel, the real engine (OpenSSH backend).

The load comes from a :class:`Client` in a process of its own, so neither it
nor the server shares a GIL with the paramiko threads or the engine that run
in this one. ``python -m wqsupervisor.harness.bench.netpaths serve|client`` are those
two processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ...process import owned_argv, terminate
from ...wqserver import free_port
from ..common import PACKAGE_ROOT
from ..sandbox import ALIAS, HeadNode
from .tunnels import PlainSsh, Supervised

AES_GCM = "aes128-gcm@openssh.com"
CHACHA = "chacha20-poly1305@openssh.com"
PROJECT = "wqs-bench"  # the name Supervised attaches with; the server answers status with it
_BLOCK = 1 << 20
_IO_TIMEOUT = 60.0


# -- the two processes at the ends ------------------------------------------------------------


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``conn``; False on end of file."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _header(conn: socket.socket, limit: int = 64) -> bytes:
    """The first line, read a byte at a time so no payload is taken with it."""
    line = b""
    while len(line) < limit and not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
    return line


def _handle(conn: socket.socket, status: bytes) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        words = _header(conn).split()
        if not words:
            return  # a readiness check: connect, then close
        if words[0] == b"bulk":
            left = int(words[1])
            buf = memoryview(bytearray(_BLOCK))
            while left > 0:
                n = conn.recv_into(buf[: min(left, _BLOCK)])
                if n == 0:
                    return
                left -= n
            conn.sendall(b"ok\n")
        elif words[0] == b"echo":
            msg = memoryview(bytearray(int(words[1])))
            while _recv_exact(conn, msg):
                conn.sendall(msg)
        elif words[0] == b"queue_status":
            conn.sendall(status)
        else:
            conn.sendall(b"[]")


def serve() -> int:
    """The server process: print ``port N``, serve until stdin closes."""
    server = socket.create_server(("127.0.0.1", 0), backlog=512)
    port = server.getsockname()[1]
    status = json.dumps([{"port": port, "project": PROJECT, "workers_connected": 0}]).encode()

    def accept() -> None:
        while True:
            conn, _ = server.accept()
            conn.settimeout(_IO_TIMEOUT)
            threading.Thread(target=_handle, args=(conn, status), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print(f"port {port}", flush=True)
    sys.stdin.read()
    return 0


def _bulk(port: int, nbytes: int, streams: int) -> dict[str, Any]:
    """Push ``nbytes`` split over ``streams`` connections; seconds until every sink said ok."""
    per = nbytes // streams
    block = memoryview(bytes(_BLOCK))
    socks = [socket.create_connection(("127.0.0.1", port), timeout=_IO_TIMEOUT) for _ in range(streams)]
    go = threading.Barrier(streams + 1)
    errors: list[str] = []

    def push(s: socket.socket) -> None:
        try:
            go.wait()
            s.sendall(b"bulk %d\n" % per)
            left = per
            while left > 0:
                s.sendall(block[: min(left, _BLOCK)])
                left -= _BLOCK
            if s.recv(16) != b"ok\n":
                errors.append(f"stream to port {port} was cut short")
        except OSError as exc:
            errors.append(f"stream to port {port}: {exc}")

    threads = [threading.Thread(target=push, args=(s,)) for s in socks]
    try:
        for t in threads:
            t.start()
        go.wait()
        started = time.perf_counter()
        for t in threads:
            t.join()
        took = time.perf_counter() - started
    finally:
        for s in socks:
            s.close()
    if errors:
        return {"error": errors[0]}
    return {"seconds": took, "bytes": per * streams}


def _echo(port: int, count: int, size: int, warmup: int) -> dict[str, Any]:
    """``count`` timed round trips of ``size`` bytes (after ``warmup`` untimed ones), in microseconds."""
    msg = bytes(size)
    back = memoryview(bytearray(size))
    rtts: list[float] = []
    with socket.create_connection(("127.0.0.1", port), timeout=_IO_TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"echo %d\n" % size)
        for i in range(warmup + count):
            started = time.perf_counter_ns()
            s.sendall(msg)
            if not _recv_exact(s, back):
                return {"error": f"the echo through port {port} ended early"}
            if i >= warmup:
                rtts.append(round((time.perf_counter_ns() - started) / 1000, 1))
    return {"rtt_us": rtts}


def client() -> int:
    """The client process: one JSON line out for each command line in.

    ``bulk PORT NBYTES STREAMS`` and ``echo PORT COUNT SIZE WARMUP``.
    """
    for line in sys.stdin:
        words = line.split()
        try:
            if words[0] == "bulk":
                answer = _bulk(int(words[1]), int(words[2]), int(words[3]))
            else:
                answer = _echo(int(words[1]), int(words[2]), int(words[3]), int(words[4]))
        except OSError as exc:
            answer = {"error": f"{words[0]} through port {words[1]}: {exc}"}
        print(json.dumps(answer), flush=True)
    return 0


class _Child:
    """A ``python -m wqsupervisor.harness.bench.netpaths ROLE`` child, driven through its pipes."""

    def __init__(self, role: str) -> None:
        self.role = role
        env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT, PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen(
            owned_argv([sys.executable, "-m", "wqsupervisor.harness.bench.netpaths", role]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def line(self) -> str:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        if not text:
            raise RuntimeError(f"the benchmark {self.role} process exited ({self.proc.wait()})")
        return text

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        terminate(self.proc, grace=2)  # type: ignore[arg-type]
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdout is not None
            self.proc.stdout.close()


class Server(_Child):
    """The sink/echo server, in a child process; :attr:`port` is where it listens."""

    def __init__(self) -> None:
        super().__init__("serve")
        try:
            self.port = int(self.line().split()[1])
        except BaseException:
            self.close()
            raise


class Client(_Child):
    """The load generator, in a child process."""

    def __init__(self) -> None:
        super().__init__("client")

    def _ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self.line())
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def bulk(self, port: int, nbytes: int, streams: int = 1) -> float:
        """Aggregate MB/s (10**6 bytes) of ``nbytes`` over ``streams`` connections to ``port``."""
        answer = self._ask(f"bulk {port} {nbytes} {streams}")
        return float(answer["bytes"]) / 1e6 / float(answer["seconds"])

    def echo(self, port: int, count: int, size: int = 64, warmup: int = 100) -> list[float]:
        """Round-trip times in microseconds of ``count`` ``size``-byte requests through ``port``."""
        answer = self._ask(f"echo {port} {count} {size} {warmup}")
        return [float(x) for x in answer["rtt_us"]]


# -- the paths ------------------------------------------------------------------------------------


def wait_listening(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0, what: str = "ssh"
) -> None:
    """Wait until 127.0.0.1:port accepts a connection; raise if ``proc`` (``what``) dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before port {port} was open")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on port {port} after {timeout:g} s")
        time.sleep(0.02)


class TwoHop:
    """The HOWTO's chain: ``ssh -N -R`` from the campus side, then the node's ``ssh -N -L`` to it.

    :attr:`remote_port` is the node's local port, the one its workers use.
    """

    name = "two-hop"

    def __init__(self, head: HeadNode, master_port: int, options: Sequence[str] = ()) -> None:
        self.campus = PlainSsh(head, master_port, options=options)
        self.remote_port = free_port()
        try:
            self.node = subprocess.Popen(
                owned_argv(
                    [
                        "ssh",
                        "-F",
                        str(head.ssh_config),
                        *options,
                        "-o",
                        "ExitOnForwardFailure=yes",
                        "-N",
                        "-L",
                        f"127.0.0.1:{self.remote_port}:127.0.0.1:{self.campus.remote_port}",
                        ALIAS,
                    ]
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_listening(self.remote_port, self.node, what="the node's ssh -N -L")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop both hops."""
        node: subprocess.Popen[bytes] | None = getattr(self, "node", None)
        if node is not None:
            terminate(node, grace=2)
        self.campus.close()
        _close_stdin(self.campus)


class ParamikoTunnel:
    """The in-process paramiko backend's reverse forward, on an event loop of its own thread."""

    name = "paramiko"

    def __init__(self, head: HeadNode, master_port: int) -> None:
        self.remote_port = free_port()
        self._session: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wqs-bench-paramiko", daemon=True)
        self._thread.start()
        try:
            settings = head.settings(remote_port=self.remote_port, backend="paramiko")
            self._session = self._call(self._start(settings, master_port), timeout=60)
            wait_listening(self.remote_port)
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self, settings: Any, master_port: int) -> Any:
        from ... import openssh
        from ...paramiko_backend import ParamikoSession

        config = await openssh.read_config(settings)
        session = await ParamikoSession.start(
            settings, config, master_port=master_port, remote_port=self.remote_port
        )
        try:
            await asyncio.wait_for(session.established(), 30)
        except BaseException:
            await session.close()
            raise
        return session

    def close(self) -> None:
        """End the session and its loop."""
        if self._session is not None:
            with contextlib.suppress(Exception):
                self._call(self._session.close(), timeout=10)
            self._session = None
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()


def first_cipher(ssh_g_output: str) -> str:
    """The client's first cipher, as ``ssh -G`` prints it: the one a default server agrees to."""
    for line in ssh_g_output.splitlines():
        key, _, value = line.strip().partition(" ")
        if key.lower() == "ciphers" and value:
            return value.split(",")[0]
    return "unknown"


def default_cipher(head: HeadNode) -> str:
    """The cipher a plain ``ssh`` to the head node ends up with."""
    res = subprocess.run(
        ["ssh", "-F", str(head.ssh_config), "-G", ALIAS],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return first_cipher(res.stdout)


Opener = Callable[[HeadNode, int], contextlib.AbstractContextManager[int]]


@contextlib.contextmanager
def _direct(_head: HeadNode, port: int) -> Iterator[int]:
    yield port


def _close_stdin(tool: Any) -> None:
    """Close the stdin pipe :class:`PlainSsh` keeps to its ssh (its close() only ends the process)."""
    proc = getattr(tool, "proc", None)
    if proc is not None and proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()


def _closing(make: Callable[[HeadNode, int], Any]) -> Opener:
    @contextlib.contextmanager
    def opener(head: HeadNode, port: int) -> Iterator[int]:
        path = make(head, port)
        try:
            yield int(path.remote_port)
        finally:
            path.close()
            _close_stdin(path)

    return opener


def _ssh_r(cipher: str | None) -> Opener:
    options = ["-o", f"Ciphers={cipher}"] if cipher else []
    return _closing(lambda head, port: PlainSsh(head, port, options=options))


@dataclass(frozen=True)
class PathSpec:
    """One way from a client to the server: how to open it, and what to divide its figures by."""

    key: str
    label: str
    open: Opener
    comparators: tuple[str, ...] = ()


PATHS: dict[str, PathSpec] = {
    spec.key: spec
    for spec in (
        PathSpec("direct", "direct loopback TCP (the limit)", _direct),
        PathSpec("ssh -R", "ssh -N -R, default cipher", _ssh_r(None), ("direct",)),
        PathSpec("ssh -R aes128-gcm", "ssh -N -R, -o Ciphers=aes128-gcm", _ssh_r(AES_GCM), ("direct",)),
        PathSpec("ssh -R chacha20", "ssh -N -R, -o Ciphers=chacha20-poly1305", _ssh_r(CHACHA), ("direct",)),
        PathSpec(
            "two-hop",
            "two-hop: ssh -N -R + node ssh -N -L",
            _closing(TwoHop),
            ("direct", "ssh -R"),
        ),
        PathSpec(
            "paramiko",
            "paramiko backend, in-process (prefers aes128-gcm)",
            _closing(ParamikoTunnel),
            ("direct", "ssh -R aes128-gcm"),
        ),
        PathSpec(
            "wqsupervisor",
            "wqsupervisor, supervised (OpenSSH, prefers aes128-gcm)",
            _closing(Supervised),
            ("direct", "ssh -R"),
        ),
    )
}
# Many workers share one ssh connection: the paths that carry them all in one.
CONCURRENT_PATHS = ("direct", "ssh -R", "wqsupervisor")


class Bed:
    """A head node, the server, the client, and every path opened on first use; closes them all."""

    def __init__(self, progress: Callable[[str], None] = lambda _text: None) -> None:
        self._stack = contextlib.ExitStack()
        self._ports: dict[str, int] = {}
        self._progress = progress
        try:
            self.head = self._stack.enter_context(HeadNode())
            self.server = Server()
            self._stack.callback(self.server.close)
            self.client = Client()
            self._stack.callback(self.client.close)
            self.default_cipher = default_cipher(self.head)
        except BaseException:
            self._stack.close()
            raise

    def port(self, key: str) -> int:
        """The port a client uses for path ``key`` (opened now if it is not open yet)."""
        if key not in self._ports:
            started = time.monotonic()
            port = self._stack.enter_context(PATHS[key].open(self.head, self.server.port))
            # One untimed push first: a new connection's windows have yet to grow.
            self.client.bulk(port, 8 * _BLOCK)
            self._ports[key] = port
            self._progress(f"opened path {key} in {time.monotonic() - started:.1f} s")
        return self._ports[key]

    def close(self) -> None:
        """Close every path, the client, the server and the head node."""
        self._stack.close()

    def __enter__(self) -> Bed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """``serve`` or ``client``."""
    role = (argv if argv is not None else sys.argv[1:])[0]
    return serve() if role == "serve" else client()


if __name__ == "__main__":
    sys.exit(main())

"""The two processes at the ends of every network path: a server posing as a master, and the load.

:class:`Server` is a sink that counts bytes, an echo for round trips, and a
status answer (``queue_status``, ``resources_status``) so that the supervisor accepts it as a master.
:class:`Client` pushes bulk bytes and times round trips. Each runs in a process
of its own, so that neither shares a GIL with the paramiko threads or the engine
of the benchmark's process; ``python -m wqsupervisor.harness.bench.traffic
serve|client`` are those two processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from ...process import owned_argv, terminate
from ..common import PACKAGE_ROOT

PROJECT = "wqs-bench"  # the name Supervised attaches with; the server answers status with it
# The unit of bulk transfer, and of the untimed push that warms a new path up.
BLOCK = 1 << 20
_IO_TIMEOUT = 60.0


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
            buf = memoryview(bytearray(BLOCK))
            while left > 0:
                n = conn.recv_into(buf[: min(left, BLOCK)])
                if n == 0:
                    return
                left -= n
            conn.sendall(b"ok\n")
        elif words[0] == b"echo":
            msg = memoryview(bytearray(int(words[1])))
            while _recv_exact(conn, msg):
                conn.sendall(msg)
        elif words[0] in (b"queue_status", b"resources_status"):
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
    block = memoryview(bytes(BLOCK))
    socks = [socket.create_connection(("127.0.0.1", port), timeout=_IO_TIMEOUT) for _ in range(streams)]
    go = threading.Barrier(streams + 1)
    errors: list[str] = []

    def push(s: socket.socket) -> None:
        try:
            go.wait()
            s.sendall(b"bulk %d\n" % per)
            left = per
            while left > 0:
                s.sendall(block[: min(left, BLOCK)])
                left -= BLOCK
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
    """A ``python -m wqsupervisor.harness.bench.traffic ROLE`` child, driven through its pipes."""

    def __init__(self, role: str) -> None:
        self.role = role
        env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT, PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen(
            owned_argv([sys.executable, "-m", "wqsupervisor.harness.bench.traffic", role]),
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


def main(argv: list[str] | None = None) -> int:
    """``serve`` or ``client``."""
    role = (argv if argv is not None else sys.argv[1:])[0]
    return serve() if role == "serve" else client()


if __name__ == "__main__":
    sys.exit(main())

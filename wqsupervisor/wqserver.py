"""A Python client for ``work_queue_server``, the real C master Debian ships.

``work_queue_server -p WQPORT -s RPCPORT -N NAME`` is a complete Work Queue
master driven over JSON-RPC: each message is a decimal length, a newline and
that many bytes of JSON. :class:`WorkQueueServer` starts one, owns it, and
gives it the same shape as ``ndcctools.work_queue.WorkQueue`` for what the
supervisor and simple scripts need: ``port``, ``name``, ``stats``,
``submit``, ``wait``, ``empty``.

Example::

    with WorkQueueServer(name="demo") as q:
        q.submit(Task("echo hello", tag="greeting"))
        while not q.empty():
            result = q.wait(5)
            if result:
                print(result.tag, result.output)

The server quits when its client says nothing for 25 s, so an idle client
sends a ``status`` call now and then; and it serves exactly one client, this one.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import MasterError, ProtocolError
from .master import MasterStats
from .process import owned_argv, terminate

_KEEPALIVE_EVERY = 8.0
# work_queue_server's JSON printer escapes ' as \', which JSON does not allow.
_BAD_QUOTE_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\'")
_START_TRIES = 5


@dataclass
class Task:
    """A command to run on a worker.

    ``input_files``/``output_files`` are ``(local path, name in the sandbox)``
    pairs; ``tag`` is kept by the client and given back with the result.
    """

    command: str
    tag: str | None = None
    cores: int = 1
    input_files: list[tuple[str, str]] = field(default_factory=list)
    output_files: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> str:
        """The task as the JSON string ``work_queue_server``'s ``submit`` takes."""

        def files(pairs: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
            return [
                {"local_name": local, "remote_name": remote, "flags": {"cache": False}}
                for local, remote in pairs
            ]

        return json.dumps(
            {
                "command_line": self.command,
                "input_files": files(self.input_files),
                "output_files": files(self.output_files),
                "cores": self.cores,
            }
        )


@dataclass(frozen=True)
class TaskResult:
    """A finished task as the master returned it."""

    taskid: int
    tag: str | None
    command: str
    output: str
    return_status: int
    result: int

    @property
    def ok(self) -> bool:
        """True when the task ran and its command exited 0."""
        return self.result == 0 and self.return_status == 0


def free_port(host: str = "") -> int:
    """A TCP port that is free right now on ``host`` (all interfaces by default)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class WorkQueueServer:
    """A ``work_queue_server`` process and the JSON-RPC connection that drives it."""

    def __init__(
        self,
        port: int = 0,
        name: str | None = None,
        *,
        program: str = "work_queue_server",
        debug_file: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        exe = shutil.which(program)
        if exe is None:
            raise MasterError(
                f"{program} is not installed",
                "install Debian's coop-computing-tools (apt-get install coop-computing-tools)",
            )
        self.name = name
        self._lock = threading.RLock()
        self._rpc_id = 0
        self._last_taskid = 0
        self._pending: dict[int, Task] = {}
        self._last_call = time.monotonic()
        self._closed = False
        self._final_stats: MasterStats | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        last_error = ""
        for _ in range(_START_TRIES if port == 0 else 1):
            wq_port = port or free_port()
            rpc_port = free_port()
            argv = [exe, "-p", str(wq_port), "-s", str(rpc_port)]
            if name:
                argv += ["-N", name]
            if debug_file:
                argv += ["-d", "all", "-o", debug_file]
            proc = subprocess.Popen(
                owned_argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            try:
                self._sock = self._connect(proc, rpc_port, start_timeout)
            except MasterError as exc:
                terminate(proc, grace=1)
                last_error = exc.message
                continue
            self._proc = proc
            self.port = wq_port
            break
        else:
            raise MasterError(
                f"work_queue_server did not start: {last_error}",
                "check that the port is free, or pass port=0 to pick one",
            )
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._rfile = self._sock.makefile("rb")
        self._drainer = threading.Thread(target=self._drain, name="wq-server-out", daemon=True)
        self._drainer.start()
        self._keepalive = threading.Thread(target=self._keep_alive, name="wq-server-keepalive", daemon=True)
        self._keepalive.start()

    @staticmethod
    def _connect(proc: subprocess.Popen[bytes], rpc_port: int, timeout: float) -> socket.socket:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = proc.stdout.readline().decode(errors="replace").strip()
        if not line.startswith("server port:"):
            proc.wait(1)
            raise MasterError(line or f"exited with status {proc.returncode}")
        while True:
            try:
                return socket.create_connection(("127.0.0.1", rpc_port), timeout=timeout)
            except OSError as exc:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise MasterError(f"RPC port {rpc_port} did not answer: {exc}") from exc
                time.sleep(0.02)

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for _ in iter(self._proc.stdout.readline, b""):
            pass

    def _keep_alive(self) -> None:
        while not self._closed:
            time.sleep(1.0)
            if time.monotonic() - self._last_call < _KEEPALIVE_EVERY:
                continue
            if self._lock.acquire(blocking=False):
                try:
                    if not self._closed:
                        self._call("status")
                except (OSError, ProtocolError):
                    return
                finally:
                    self._lock.release()

    def _call(self, method: str, params: Any = None, timeout: float | None = 30.0) -> Any:
        with self._lock:
            if self._closed:
                raise MasterError("the master is closed")
            self._rpc_id += 1
            request = json.dumps(
                {"jsonrpc": "2.0", "method": method, "id": self._rpc_id, "params": params}
            ).encode()
            self._sock.settimeout(timeout)
            self._sock.sendall(str(len(request)).encode() + b"\n" + request)
            # The server writes the length and the body in two writes, so its
            # Nagle holds the body until our ACK of the length, which Linux
            # delays 40 ms: ask for an immediate ACK, before each read.
            self._quickack()
            header = self._rfile.readline()
            self._quickack()
            if not header:
                raise ProtocolError(f"work_queue_server closed the connection during {method!r}")
            body = self._rfile.read(int(header))
            self._last_call = time.monotonic()
        reply = _loads(body)
        if "error" in reply:
            return _Error(str(reply["error"]))
        return reply.get("result")

    def _quickack(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    @property
    def stats(self) -> MasterStats:
        """A snapshot of the master's counters; after :meth:`close`, the last one taken."""
        if self._closed and self._final_stats is not None:
            return self._final_stats
        reply = self._call("status")
        if isinstance(reply, _Error):
            raise ProtocolError(f"status failed: {reply.message}")
        return MasterStats.from_any(_loads(reply))

    def submit(self, task: Task | str) -> int:
        """Queue ``task`` (a :class:`Task` or a command line); returns its task id."""
        if isinstance(task, str):
            task = Task(task)
        with self._lock:
            reply = self._call("submit", task.to_json())
            if isinstance(reply, _Error):
                raise MasterError(f"submit failed: {reply.message}")
            # The server numbers tasks 1, 2, 3... in the order it accepts them
            # and does not say so in its reply; this client is its only client.
            self._last_taskid += 1
            self._pending[self._last_taskid] = task
            return self._last_taskid

    def wait(self, timeout: int) -> TaskResult | None:
        """Wait up to ``timeout`` seconds for a finished task; None if none finished."""
        reply = self._call("wait", int(timeout), timeout=timeout + 30.0)
        if isinstance(reply, _Error) or not reply:
            return None
        data = _loads(reply)
        taskid = int(data["taskid"])
        task = self._pending.pop(taskid, None)
        return TaskResult(
            taskid=taskid,
            tag=task.tag if task else None,
            command=str(data.get("command_line", "")),
            output=str(data.get("output", "")),
            return_status=int(data.get("return_status", -1)),
            result=int(data.get("result", -1)),
        )

    def empty(self) -> bool:
        """True when no submitted task is left to return."""
        return bool(self._call("empty") == "Empty")

    def hungry(self) -> bool:
        """True when the master would like more tasks (here: when it has none waiting)."""
        return self.stats.tasks_waiting == 0

    def close(self) -> None:
        """Stop the server process and close the connection."""
        if self._closed:
            return
        with contextlib.suppress(OSError, ProtocolError, ValueError):
            self._final_stats = self.stats
        with self._lock:
            self._closed = True
            with contextlib.suppress(OSError):
                self._rfile.close()
                self._sock.close()
        if self._proc is not None:
            terminate(self._proc, grace=2)
            if self._proc.stdout is not None:
                self._proc.stdout.close()

    def __enter__(self) -> WorkQueueServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running"
        return f"<WorkQueueServer port={getattr(self, 'port', None)} name={self.name!r} {state}>"


@dataclass(frozen=True)
class _Error:
    message: str


def _loads(text: str | bytes) -> Any:
    """``json.loads`` that accepts the server's ``\\'`` escapes."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return json.loads(_BAD_QUOTE_ESCAPE.sub(r"\1'", text))

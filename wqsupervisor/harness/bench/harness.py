"""The pieces every benchmark shares: a master in a child process, the paths to it, figures."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ...master import MasterInfo
from ...process import owned_argv, terminate
from ...runner import EngineThread
from ...wqserver import free_port
from ..sandbox import ALIAS, HeadNode, debian_work_queue_path, start_worker
from .master import PREFIX

REPO_ROOT = str(Path(__file__).resolve().parents[3])


class MasterProcess:
    """A master in a child process (see :mod:`wqsupervisor.harness.bench.master`)."""

    def __init__(self, binding: str = "debian", pythonpath: str | None = None) -> None:
        paths = [REPO_ROOT]
        if binding == "debian":
            paths.append(debian_work_queue_path())
        if pythonpath:
            paths.append(pythonpath)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen(
            owned_argv([sys.executable, "-m", "wqsupervisor.harness.bench.master", binding]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.port = int(self._line())

    def _line(self) -> str:
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            if line.startswith(PREFIX):
                return line[len(PREFIX) :].strip()
        raise RuntimeError(f"the benchmark master exited ({self.proc.wait()})")

    def send(self, command: str) -> str:
        """Send one command and return its answer line."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line()

    def start(self, command: str) -> None:
        """Send a command without waiting for its answer (read it later with :meth:`answer`)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def answer(self) -> str:
        """The answer of a command sent with :meth:`start`."""
        return self._line()

    def run(self, n: int, command: str = "true") -> dict[str, Any]:
        """Run n tasks; returns the submit time and every completion time."""
        result: dict[str, Any] = json.loads(self.send(f"run {n} {command}"))
        return result

    def close(self) -> None:
        """Stop the master."""
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        terminate(self.proc, grace=3)  # type: ignore[arg-type]


def queue_status(port: int, timeout: float = 0.5) -> dict[str, Any] | None:
    """Whatever answers ``queue_status`` on 127.0.0.1:port, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"queue_status\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        reply = json.loads(data) if data else None
    except (OSError, ValueError):
        return None
    return reply[0] if isinstance(reply, list) and reply else None


class Supervised:
    """The supervised tunnel (the engine the ``run`` command uses) for one master."""

    name = "wqsupervisor"

    def __init__(self, head: HeadNode, master_port: int, remote_port: int | None = None) -> None:
        self.remote_port = remote_port or free_port()
        self.host = EngineThread(log=False)
        self.sup = self.host.call(self._attach(head, master_port))
        if not self.host.call(self._up(), timeout=60):
            raise RuntimeError("the supervised tunnel did not come up")

    async def _attach(self, head: HeadNode, master_port: int) -> Any:
        settings = head.settings(remote_port=self.remote_port, allow_no_password=True)
        return self.host.engine.attach(MasterInfo(port=master_port, name="wqs-bench"), settings)

    async def _up(self) -> bool:
        import asyncio

        try:
            await asyncio.wait_for(self.sup.tunnel.up_event.wait(), 30)
        except TimeoutError:
            return False
        return True

    def ssh_pid(self) -> int:
        pid = self.host.snapshot()["masters"][0]["tunnel"]["ssh_pid"]
        return int(pid)

    def close(self) -> None:
        self.host.stop()


class PlainSsh:
    """The HOWTO's ``ssh -N -R`` (``session=True``: the same forward with a waiting remote command)."""

    def __init__(
        self,
        head: HeadNode,
        master_port: int,
        *,
        session: bool = False,
        autossh: bool = False,
        options: Sequence[str] = (),
    ) -> None:
        self.remote_port = free_port()
        self.name = "autossh" if autossh else ("ssh -T -R cat" if session else "ssh -N -R")
        argv = [
            "-F",
            str(head.ssh_config),
            *options,
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            f"127.0.0.1:{self.remote_port}:localhost:{master_port}",
        ]
        argv += ["-T", ALIAS, "cat"] if session else ["-N", ALIAS]
        if autossh:
            exe = shutil.which("autossh")
            if exe is None:
                raise RuntimeError("autossh is not installed (apt-get install autossh)")
            env = dict(os.environ, AUTOSSH_GATETIME="0", AUTOSSH_POLL="600")
            self.proc = subprocess.Popen(
                owned_argv([exe, "-M", "0", *argv]),
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        else:
            self.proc = subprocess.Popen(
                owned_argv(["ssh", *argv]),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while not _listening(self.remote_port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} did not open port {self.remote_port}")
            time.sleep(0.01)

    def ssh_pid(self) -> int:
        if self.name != "autossh":
            return self.proc.pid
        from ..sandbox import children_of

        kids = [p for p in children_of(self.proc.pid) if _comm(p) == "ssh"]
        if not kids:
            raise RuntimeError("autossh has no ssh child")
        return kids[0]

    def close(self) -> None:
        terminate(self.proc, grace=3)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def workers(port: int, n: int, *, program: str | None = None) -> Iterator[list[subprocess.Popen[bytes]]]:
    """n real workers on 127.0.0.1:port, stopped when the block ends."""
    procs = [start_worker(port, max_backoff=2, program=program) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            terminate(p, grace=2)


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """Median, min, max and count of a list of figures."""
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""

    def version(argv: list[str]) -> str:
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "missing"
        return (res.stdout + res.stderr).strip().splitlines()[0] if (res.stdout + res.stderr).strip() else ""

    from ... import __version__

    return {
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "openssh": version(["ssh", "-V"]),
        "cctools": version(["work_queue_worker", "--version"]),
        "wqsupervisor": __version__,
    }

"""Helpers shared by the tests: real processes, waited on with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from wqsupervisor.children import comm
from wqsupervisor.config import Settings
from wqsupervisor.harness.sandbox import debian_work_queue_path  # noqa: F401 - re-exported for the tests
from wqsupervisor.process import pid_alive
from wqsupervisor.remoteport import RELAY_NAME
from wqsupervisor.wqserver import Task

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
# A cctools build's Python directory (ndcctools is not on PyPI, nor in CI; see the README).
NDCCTOOLS = os.environ.get("WQS_NDCCTOOLS_PYTHONPATH", "")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something true; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def processes_matching(needle: str) -> list[int]:
    """Pids of live processes whose command line contains ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def python_env(*extra_paths: str) -> dict[str, str]:
    """The environment for a child Python that imports this checkout (and ``extra_paths``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *extra_paths, env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    return env


def run_python(
    code: str,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env or python_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextlib.contextmanager
def popen(argv: list[str], **kwargs: object) -> Iterator[subprocess.Popen[str]]:
    """A child that is killed and reaped when the block ends, whatever happens."""
    proc = subprocess.Popen(argv, text=True, **kwargs)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def run_tasks(q: Any, n: int, on_progress=None, timeout: float = 120) -> dict[str, list[str]]:
    """Submit n tasks with distinct outputs and collect every result by tag."""
    for i in range(n):
        q.submit(Task(f"echo out-{i}-$(({i}*7))", tag=str(i)))
    results: dict[str, list[str]] = {}
    deadline = time.monotonic() + timeout
    while not q.empty():
        assert time.monotonic() < deadline, f"tasks not done in {timeout} s: {len(results)} of {n}"
        r = q.wait(1)
        if r is None:
            continue
        assert r.ok, r
        results.setdefault(r.tag, []).append(r.output.strip())
        if on_progress:
            on_progress(sum(len(v) for v in results.values()))
    return results


def assert_exactly_once(results: dict[str, list[str]], n: int) -> None:
    """Every task came back once, with the output of ``run_tasks``' commands."""
    assert sorted(results, key=int) == [str(i) for i in range(n)], "a task is missing"
    for tag, outputs in results.items():
        assert outputs == [f"out-{tag}-{int(tag) * 7}"], f"task {tag} returned {outputs}"


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def drive(body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` in a fresh event loop and check that it leaves no thread and no descriptor behind."""
    threads = {t.ident for t in threading.enumerate()}
    fds = _fds()
    asyncio.run(body())
    left = [t.name for t in threading.enumerate() if t.ident not in threads]
    assert not left, f"threads left: {left}"
    assert _fds() <= fds, f"descriptors left: {sorted(_fds() - fds)}"


def lab_relays(lab: Any, host: str, name: str = RELAY_NAME) -> list[int]:
    """Head relay daemons (named ``wqs-relay``; hop daemons: ``wqs-hop``) in the lab namespace ``host``."""
    return [pid for pid in lab.pids(host) if comm(pid) == name]


def relay_pids(port: int) -> list[int]:
    """Head relay daemons (named ``wqs-relay``) serving ``port``, by their process name and arguments.

    The port tells this test's relay from those of tests or benchmarks running beside it.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or comm(int(entry)) != RELAY_NAME:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if str(port).encode() in args:
            pids.append(int(entry))
    return pids


def head_argv(command: str, head: Any, remote_port: int, *extra: str) -> list[str]:
    """``python -m wqsupervisor COMMAND`` to the loopback head node on ``remote_port``, then ``extra``."""
    return [
        sys.executable,
        "-m",
        "wqsupervisor",
        command,
        "--via",
        "headnode",
        "--ssh-config",
        str(head.ssh_config),
        "--remote-port",
        str(remote_port),
        *extra,
    ]


def persistent_fds(pid: int) -> set[str]:
    """The agent's descriptors that stay open for 3 s (longer than any probe lives), by what they are."""

    def look() -> set[tuple[str, str]]:
        found = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                found.add((fd, os.readlink(f"/proc/{pid}/fd/{fd}")))
        return found

    kept = look()
    for _ in range(15):
        time.sleep(0.2)
        kept &= look()
    return {describe_fd(pid, fd, target) for fd, target in kept}


def describe_fd(pid: int, fd: str, target: str) -> str:
    """A descriptor by kind and, for a TCP socket, its ports and state (fd numbers are reused)."""
    if not target.startswith("socket:["):
        return target
    inode = target[8:-1]
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table.rsplit('/', 1)[1]}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[9] == inode:
                    return f"tcp {fields[1]} {fields[2]} state {fields[3]} (fd {fd})"
    return f"socket (fd {fd})"


@contextlib.contextmanager
def root_lab(**options: Any) -> Iterator[Any]:
    """A firewall lab (``Lab(**options)``), removed afterwards whatever happens; root only, as in CI."""
    import pytest

    from wqsupervisor.harness.lab import Lab

    if os.geteuid() != 0:
        pytest.fail("the lab tests need root (network namespaces, iptables, a lab user); CI runs as root")
    with Lab(**options) as lab:
        yield lab


def ndcctools_bin() -> Path:
    """The ``bin`` directory of the cctools build that ``NDCCTOOLS`` belongs to."""
    return Path(NDCCTOOLS).parents[2] / "bin"


def ndcctools_env() -> dict[str, str]:
    """A child's environment with ndcctools importable, and the build's programs and this Python first."""
    env = python_env(NDCCTOOLS)
    env["PATH"] = os.pathsep.join([str(ndcctools_bin()), str(Path(sys.executable).parent), env["PATH"]])
    return env


def need_ndcctools(module: str) -> None:
    """Skip the test unless ``module`` of ndcctools imports (the only reason a test may skip)."""
    probe = [sys.executable, "-c", f"import {module}"]
    if (
        not NDCCTOOLS
        or subprocess.run(probe, env=ndcctools_env(), capture_output=True, check=False).returncode
    ):
        pytest.skip(f"{module} is not importable (set WQS_NDCCTOOLS_PYTHONPATH to a cctools build)")


class TunnelCuts(threading.Thread):
    """Kills a supervisor's ssh client, then, once it is back, the head's session, as work is done.

    ``done()`` counts finished work; the ssh kill comes at ``first``, the session kill at ``second``
    (without ``second``, none); each waits for the tunnel to be up again, asked of ``status --pid``
    (the supervisor's process: ``attach``, ``run`` or the drop-in's agent). ``cuts`` lists what
    was killed; ``join()`` re-raises what went wrong.
    """

    def __init__(
        self, attach_pid: int, done: Callable[[], int], first: int, second: int | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.attach_pid, self.done, self.first, self.second = attach_pid, done, first, second
        self.cuts: list[str] = []
        self.error: BaseException | None = None

    def tunnel(self) -> dict[str, Any]:
        argv = [sys.executable, "-m", "wqsupervisor", "status", "--json", "--pid", str(self.attach_pid)]
        out = subprocess.run(argv, capture_output=True, text=True, env=python_env(), timeout=30).stdout
        snaps = json.loads(out or "[]")
        return snaps[0]["masters"][0]["tunnel"] if snaps else {}

    def up_again(self, before: dict[str, Any]) -> dict[str, Any]:
        def back() -> dict[str, Any] | None:
            now = self.tunnel()
            new = now.get("state") == "up" and now.get("remote_pid") not in (None, before["remote_pid"])
            return now if new else None

        return wait_for(back, 60, "the tunnel back after a cut", interval=0.2)

    def run(self) -> None:
        second = self.second
        try:
            wait_for(lambda: self.done() >= self.first, 120, f"{self.first} done before the ssh kill")
            tunnel = self.tunnel()
            os.kill(tunnel["ssh_pid"], signal.SIGKILL)
            self.cuts.append("ssh")
            tunnel = self.up_again(tunnel)
            if second is None:
                return
            wait_for(lambda: self.done() >= second, 120, f"{second} done before the session kill")
            os.kill(tunnel["remote_pid"], signal.SIGKILL)
            self.cuts.append("session")
            tunnel = self.up_again(tunnel)
            assert tunnel["restarts"] >= 2, tunnel
        except BaseException as exc:  # re-raised by join()
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        assert not self.is_alive(), "the cuts did not end"
        if self.error is not None:
            raise self.error


_LISTEN = (
    "import socket, sys, time\n"
    "s = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
    "print('ready', flush=True)\n"
    "time.sleep(300)\n"
)


@contextlib.contextmanager
def holding(tmp_path: Path, name: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """A real process whose /proc/PID/comm is ``name``, listening on 127.0.0.1:``port``."""
    exe = tmp_path / name
    exe.symlink_to(sys.executable)  # the kernel names a process after the file it ran
    with subprocess.Popen([str(exe), "-c", _LISTEN, str(port)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert wait_for(proc.stdout.readline, 30, "the holder to listen").strip() == "ready"
            assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == name
            yield proc
        finally:
            proc.kill()
            proc.wait()


async def echo_back(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An asyncio server's handler that sends every byte back, until the peer closes."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def ssh_entry(alias: str, node: Any, *extra: str, known_hosts: Path | None = None) -> str:
    """An ssh_config ``Host alias`` block for a loopback HeadNode (``extra`` lines appended)."""
    lines = [
        f"Host {alias}",
        "    HostName 127.0.0.1",
        f"    Port {node.port}",
        f"    User {node.user}",
        f"    IdentityFile {node.identity}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {known_hosts or node.known_hosts}",
        *(f"    {line}" for line in extra),
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def gone_supervisor(master: Any, settings: Settings) -> Iterator[int]:
    """A supervisor whose agent is SIGKILLed once up, its head session SIGSTOPped (hung): yields that
    session's pid, which is let go (SIGCONT, SIGKILL) at the end."""
    from wqsupervisor import supervise

    hung = None
    try:
        first = supervise(master, settings)
        try:
            assert first.wait_until_up(20)
            hung = first.snapshot().masters[0].tunnel.remote_pid
            assert hung is not None
            os.kill(hung, signal.SIGSTOP)
            os.kill(first._agent.pid, signal.SIGKILL)
        finally:
            first.close()
        yield hung
    finally:
        if hung is not None and pid_alive(hung):
            with contextlib.suppress(ProcessLookupError):  # SIGCONT may let it end first
                os.kill(hung, signal.SIGCONT)
                os.kill(hung, signal.SIGKILL)

"""Helpers shared by the tests: real processes, waited on with deadlines."""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from wqsupervisor.process import pid_alive

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
DEBIAN_DIST = Path("/usr/lib/python3/dist-packages")


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


def debian_work_queue_path() -> str:
    """A directory holding only Debian's ``work_queue`` module, for PYTHONPATH.

    Debian's python3-workqueue is a real SWIG master whose ``wait()`` holds the
    GIL, like ndcctools'. It is built for Debian's Python 3.11; the directory
    keeps the rest of Debian's dist-packages out of the test interpreter.
    """
    target = Path(tempfile.gettempdir()) / f"wqs-debian-wq-{os.getuid()}"
    target.mkdir(exist_ok=True)
    for name in ["work_queue.py", *[Path(p).name for p in glob.glob(str(DEBIAN_DIST / "_work_queue*.so"))]]:
        link = target / name
        if not link.exists():
            with contextlib.suppress(FileExistsError):
                link.symlink_to(DEBIAN_DIST / name)
    if not (target / "work_queue.py").exists():
        raise AssertionError("Debian's python3-workqueue is not installed: run ./setup.sh")
    return str(target)


def python_env(*extra_paths: str) -> dict[str, str]:
    """The environment for a child Python that imports this checkout (and ``extra_paths``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *extra_paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    return env


def run_python(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], env=env or python_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


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

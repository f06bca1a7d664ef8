"""Fixtures: a real loopback head node (sshd), a real master, real workers, and a leak check."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from wqsupervisor.events import Event
from wqsupervisor.harness.sandbox import HeadNode, start_worker
from wqsupervisor.process import pid_alive, terminate
from wqsupervisor.wqserver import WorkQueueServer

from support import free_port

# Every process this test run starts inherits this marker, orphans included, so the
# leak check below looks at our own processes, not at whatever else the machine runs.
RUN_ID = uuid.uuid4().hex
os.environ["WQS_TEST_RUN"] = RUN_ID


def _ours() -> set[int]:
    needle = f"WQS_TEST_RUN={RUN_ID}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.add(int(entry))
        except OSError:
            continue
    return {pid for pid in found if pid_alive(pid)}


@pytest.fixture(autouse=True)
def no_orphans() -> Iterator[None]:
    """Fail the test if a process it started (ssh, agent, worker, master, sshd...) survives it."""
    before = _ours()
    yield
    deadline = time.monotonic() + 10
    left: set[int] = set()
    while time.monotonic() < deadline:
        left = _ours() - before
        if not left:
            return
        time.sleep(0.1)
    details = []
    for pid in sorted(left):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as fh:
            details.append(f"{pid}: " + fh.read().replace(b"\0", b" ").decode())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    pytest.fail("processes outlived the test:\n" + "\n".join(details))


@pytest.fixture
def head() -> Iterator[HeadNode]:
    """A throwaway sshd on loopback playing the head node (alias 'headnode')."""
    with HeadNode() as node:
        yield node


@pytest.fixture
def master() -> Iterator[WorkQueueServer]:
    """A real C master (Debian's work_queue_server)."""
    with WorkQueueServer(name=f"wqs-test-{uuid.uuid4().hex[:8]}") as q:
        yield q


@pytest.fixture
def remote_port() -> int:
    """A port that is free on the (loopback) head node."""
    return free_port()


@pytest.fixture
def workers() -> Iterator[Callable[..., list[subprocess.Popen[bytes]]]]:
    """Start real work_queue_worker processes that are given only the port they must use."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(port: int, n: int = 1, **options: object) -> list[subprocess.Popen[bytes]]:
        new = [start_worker(port, **options) for _ in range(n)]  # type: ignore[arg-type]
        procs.extend(new)
        return new

    yield start
    for proc in procs:
        terminate(proc, grace=2)


class Recorder:
    """Collects events from a supervisor and waits for one with a deadline."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def names(self) -> list[str]:
        with self._cond:
            return [e.name for e in self.events]

    def of(self, kind: type[Event]) -> list[Event]:
        with self._cond:
            return [e for e in self.events if isinstance(e, kind)]

    def wait(
        self,
        kind: type[Event],
        timeout: float,
        count: int = 1,
        where: Callable[[Event], bool] = lambda e: True,
    ) -> list[Event]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if isinstance(e, kind) and where(e)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {count} x {kind.name} within {timeout} s; saw {self.names()}")
                self._cond.wait(left)


@pytest.fixture
def recorder() -> Recorder:
    """An event recorder to pass as on_event=."""
    return Recorder()

"""Masters whose ``wait()`` holds the GIL: Debian's work_queue bindings, and ndcctools when present.

ndcctools is not on PyPI and cannot be installed here; its variants skip unless
``WQS_NDCCTOOLS_PYTHONPATH`` points at a build (see the README). Debian's
python3-workqueue is a SWIG master with the same property and always runs.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from support import debian_work_queue_path, python_env, wait_for

NDCCTOOLS_PATH = os.environ.get("WQS_NDCCTOOLS_PYTHONPATH", "")


def _binding_env(binding: str) -> dict[str, str]:
    if binding == "debian":
        return python_env(debian_work_queue_path())
    env = python_env(NDCCTOOLS_PATH)
    probe = subprocess.run(
        [sys.executable, "-c", "import ndcctools.work_queue"], env=env, capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip("ndcctools is not importable (set WQS_NDCCTOOLS_PYTHONPATH to a cctools build)")
    return env


BINDINGS = ["debian", pytest.param("ndcctools", marks=pytest.mark.ndcctools)]

_IMPORT = """
import sys
if sys.argv[1] == "ndcctools":
    from ndcctools.work_queue import Task, WorkQueue
else:
    from work_queue import Task, WorkQueue
"""

_WAITING_APP = _IMPORT + textwrap.dedent(
    """
    import threading, time
    from wqsupervisor import Settings, supervise
    cfg, remote_port, wait_for, beats = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    q = WorkQueue(port=0, name="gil-test")
    settings = Settings(via="headnode", ssh_config=cfg, remote_port=remote_port, allow_no_password=True,
                        stable_after=0.5)
    sup = supervise(q, settings, log_events=False)
    assert sup.wait_until_up(30), sup.failure

    def beat():
        while True:
            with open(beats, "a") as fh:
                fh.write(f"{time.time()}\\n")
            time.sleep(0.05)

    threading.Thread(target=beat, daemon=True).start()
    q.submit(Task("sleep 1000"))  # no worker: wait() sits out its whole timeout
    time.sleep(0.3)
    ssh_pid = sup.snapshot().masters[0].tunnel.ssh_pid
    print("waiting", ssh_pid, q.port, time.time(), flush=True)
    q.wait(wait_for)
    print("returned", time.time(), flush=True)
    sup.close()
    """
)


class _Lines:
    """The app's stdout read line by line straight from the pipe (no hidden buffer), so that
    "has it printed X yet?" can be asked without blocking. cctools' own notices are skipped."""

    def __init__(self, pipe) -> None:
        self.fd = pipe.fileno()
        self.buf = b""

    def _take(self, word: str) -> str | None:
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.decode(errors="replace").startswith(word):
                return line.decode()
        return None

    def next(self, word: str, timeout: float) -> str:
        """The next line starting with ``word``; fails at the end of the output or the deadline."""
        deadline = time.monotonic() + timeout
        while (found := self._take(word)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"no {word!r} line from the app within {timeout} s")
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise AssertionError(f"the app ended without a {word!r} line")
            self.buf += chunk
        return found

    def printed(self, word: str) -> str | None:
        """A line starting with ``word`` printed by now (the end of output counts too)."""
        while select.select([self.fd], [], [], 0)[0]:
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return self._take(word) or "(end of output)"
            self.buf += chunk
        return self._take(word)


def _queue_status_through(port: int, timeout: float = 1.0) -> dict | None:
    """Ask whatever answers on the head node's remote port for its queue status."""
    import json

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"queue_status\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return json.loads(data)[0] if data else None
    except (OSError, ValueError):
        return None


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("wait_seconds", [5, 60])
def test_recovery_does_not_wait_for_a_gil_holding_wait(head, remote_port, tmp_path, binding, wait_seconds):
    """ssh is killed while the app sits in q.wait(N) holding the GIL: the forward is back before wait returns."""
    beats = tmp_path / "beats"
    argv = [
        sys.executable,
        "-c",
        _WAITING_APP,
        binding,
        str(head.ssh_config),
        str(remote_port),
        str(wait_seconds),
        str(beats),
    ]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, env=_binding_env(binding)) as app:
        try:
            lines = _Lines(app.stdout)
            line = lines.next("waiting", 60)
            _, ssh_pid, master_port, entered = line.split()
            time.sleep(1.0)
            killed_at = time.time()
            os.kill(int(ssh_pid), signal.SIGKILL)
            status = wait_for(
                lambda: _queue_status_through(remote_port),
                wait_seconds,
                "the forward to reach the master again",
            )
            restored_at = time.time()
            assert status["port"] == int(master_port)
            returned = lines.printed("returned")
            assert not returned, f"wait() returned before the forward was restored: {returned!r}"
            assert restored_at < float(entered) + wait_seconds
            stamps = [float(x) for x in beats.read_text().split()]
            during = [t for t in stamps if killed_at < t < restored_at]
            assert not during, "the app's threads ran during wait(): this master does not hold the GIL"
        finally:
            app.kill()
            app.wait()


_UNCHANGED_APP = _IMPORT + textwrap.dedent(
    """
    from wqsupervisor import Settings, supervise
    q = WorkQueue(port=0, name="unchanged")
    cls = type(q)
    before = (cls.__init__, cls.wait, cls.submit, cls.empty, q.port, q.name, q.empty(), q.wait(0))
    t = Task("true")
    first = q.submit(t)
    sup = supervise(q, Settings(via="headnode", ssh_config=sys.argv[2], remote_port=int(sys.argv[3]),
                                allow_no_password=True), log_events=False)
    assert sup.wait_until_up(30), sup.failure
    after = (cls.__init__, cls.wait, cls.submit, cls.empty, q.port, q.name, q.empty(), q.wait(0))
    second = q.submit(Task("true"))
    sup.close()
    assert before[:6] == after[:6], [(a, b) for a, b in zip(before, after) if a != b]
    assert type(before[6]) is type(after[6])
    assert before[6] and not after[6]  # the task submitted in between, nothing else
    assert before[7] is None and after[7] is None
    assert type(first) is type(second) and second == first + 1, (first, second)
    print("unchanged")
    """
)


@pytest.mark.parametrize("binding", BINDINGS)
def test_attaching_changes_nothing_of_the_master(head, remote_port, binding):
    """supervise() patches no method, and the master's calls return what they returned before."""
    res = subprocess.run(
        [sys.executable, "-c", _UNCHANGED_APP, binding, str(head.ssh_config), str(remote_port)],
        env=_binding_env(binding),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("unchanged")

"""The master's reply timeout: a worker whose answer is late is kept, not dropped.

A Work Queue master asks a worker for its results and drops the worker when
the answer takes longer than ``short-timeout`` (5 s of its own). Behind a
tunnel that stalls and resumes, the answer can be that late while nothing is
lost. Here a real worker reaches a real master (Debian's bindings) through the
supervised tunnel and a relay on the head node that holds the worker's answer
for 8 s, once; the master keeps the worker with the supervisor's default and
drops it with ``master_timeout=0`` (the master's own 5 s), and in both cases
every task comes back exactly once.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from wqsupervisor.config import Settings
from wqsupervisor.master import set_reply_timeout

from support import debian_work_queue_path, python_env

HOLD = 8.0  # seconds the relay holds one answer: beyond 5 s, well within the default
TASKS = 20

_APP = r"""
import json, sys
import work_queue
from wqsupervisor import supervise
from wqsupervisor.status import format_text

ssh_config, remote_port, timeout, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
q = work_queue.WorkQueue(port=0, name="reply-timeout")
sup = supervise(q, via="headnode", ssh_config=ssh_config, remote_port=remote_port,
                allow_no_password=True, master_timeout=timeout, log_events=False)
assert sup.wait_until_up(60), "the tunnel did not come up"
snap = sup.snapshot()
print(json.dumps({"reply_timeout": sup.info.reply_timeout, "status": format_text([snap])}), flush=True)
for i in range(n):
    t = work_queue.Task(f"sleep 0.3; echo out-{i}")
    t.specify_tag(str(i))
    q.submit(t)
results = {}
while not q.empty():
    t = q.wait(5)
    if t is not None:
        results.setdefault(t.tag, []).append(t.output.strip())
removed = q.stats.workers_removed
sup.close()
print(json.dumps({"results": results, "workers_removed": removed}), flush=True)
"""


class _Relay:
    """host:port -> the head's remote port, holding the worker's answer once.

    After the worker's third ``available_results`` has gone through, the next
    bytes from the worker (its answer to the master's ``send_results``) wait
    ``HOLD`` seconds, as behind a stalled tunnel that then resumes.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held = threading.Event()
        self._seen = 0
        self._socks: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                worker, _ = self.listener.accept()
            except OSError:
                return
            master = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            master.settimeout(None)
            self._socks += [worker, master]
            threading.Thread(target=self._pump, args=(worker, master, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(master, worker, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_worker: bool) -> None:
        hold_next = False
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if hold_next:
                    hold_next = False
                    self.held.set()
                    time.sleep(HOLD)
                dst.sendall(data)
                if from_worker and not self.held.is_set() and b"available_results" in data:
                    self._seen += 1
                    hold_next = self._seen == 3
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.close()


@contextlib.contextmanager
def _relay(target: int) -> Iterator[_Relay]:
    relay = _Relay(target)
    try:
        yield relay
    finally:
        relay.close()


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[dict[str, Any]]:
    """The application's JSON lines, read on a thread so that waiting on them has a deadline."""
    lines: queue.Queue[dict[str, Any]] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with contextlib.suppress(ValueError):
                lines.put(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    return lines


@pytest.mark.parametrize(("master_timeout", "kept"), [(Settings().master_timeout, True), (0, False)])
def test_a_late_answer_keeps_its_worker(head, remote_port, workers, master_timeout, kept):
    argv = [
        sys.executable,
        "-c",
        _APP,
        str(head.ssh_config),
        str(remote_port),
        str(master_timeout),
        str(TASKS),
    ]
    with (
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, text=True, env=python_env(debian_work_queue_path())
        ) as app,
        _relay(remote_port) as relay,
    ):
        lines = _lines(app)
        try:
            up = lines.get(timeout=90)
            assert up["reply_timeout"] == (master_timeout or None)
            shown = f"waits {master_timeout} s for a worker's reply"
            assert (shown in up["status"]) == kept, up["status"]
            workers(relay.port, n=1)
            done = lines.get(timeout=120)
            assert app.wait(30) == 0
        finally:
            if app.poll() is None:
                app.kill()
    assert relay.held.is_set(), "the relay never held an answer: the test proved nothing"
    results = done["results"]
    assert sorted(results, key=int) == [str(i) for i in range(TASKS)], "a task is missing"
    assert all(results[str(i)] == [f"out-{i}"] for i in range(TASKS)), results
    assert done["workers_removed"] == (0 if kept else 1)


def test_masters_without_tune_are_left_alone(master):
    # WorkQueueServer drives work_queue_server over RPC and has no tune(): nothing is set.
    assert set_reply_timeout(master, 60) is None
    assert set_reply_timeout(object(), 60) is None

"""The demo: the whole story on one machine, with real parts and a real cut.

A throwaway loopback "head node" sshd, a real Work Queue master
(``work_queue_server``), local ``work_queue_worker`` processes that know only
the head node's forwarded port, and a supervised tunnel between them. While
the tasks run, the tunnel is cut (the ssh client is SIGKILLed; a second cut
kills the head node's sshd session instead); the demo checks that every task
came back exactly once with the right output and says how long recovery took.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from .. import validation as check
from ..events import Event, TunnelDown, TunnelUp, WorkerCountChanged
from ..process import terminate
from ..protocol import SupervisorSnapshot
from ..supervisor import supervise
from ..wqserver import Task, WorkQueueServer, free_port
from .sandbox import HeadNode, start_worker


@dataclass
class _Timeline:
    """Events the demo needs, stamped on arrival."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ups: list[TunnelUp] = field(default_factory=list)
    downs: list[TunnelDown] = field(default_factory=list)
    counts: list[tuple[float, int]] = field(default_factory=list)

    def __call__(self, event: Event) -> None:
        with self.lock:
            if isinstance(event, TunnelUp):
                self.ups.append(event)
            elif isinstance(event, TunnelDown):
                self.downs.append(event)
            elif isinstance(event, WorkerCountChanged):
                self.counts.append((event.at, event.connected))

    def workers_back(self, since: float, n: int) -> float | None:
        with self.lock:
            for at, connected in self.counts:
                if at > since and connected >= n:
                    return at - since
        return None

    def kept(self, since: float, until: float, n: int) -> bool:
        """No worker left between ``since`` and ``until`` (the relay resumed their connections)."""
        with self.lock:
            return all(connected >= n for at, connected in self.counts if since < at <= until)


def _expected(i: int) -> str:
    return f"task {i} squared is {i * i}"


def check_demo(tasks: int, workers: int, cuts: int) -> None:
    """Raise :class:`ConfigError` unless the counts make a demo that can finish."""
    check.count("tasks", tasks, 1, 100_000)
    # Without a worker the tasks would wait for ever.
    check.count("workers", workers, 1, 64)
    check.count("cuts", cuts, 0, tasks - 1 if tasks > 1 else 0)


def run_demo(tasks: int = 200, workers: int = 2, cuts: int = 1) -> int:
    """Run the demo; returns 0 when every task came back once and correct.

    Raises :class:`ConfigError` for counts it cannot run with, before anything starts.
    """
    check_demo(tasks, workers, cuts)
    started = time.monotonic()
    timeline = _Timeline()
    cut_log: list[tuple[str, float, int]] = []
    results: dict[str, list[str]] = {}
    with contextlib.ExitStack() as stack:
        head = stack.enter_context(HeadNode())
        q = stack.enter_context(WorkQueueServer(name="wqsupervisor-demo"))
        remote_port = free_port("127.0.0.1")
        print(
            f"demo: head node sshd on 127.0.0.1:{head.port} (alias '{head.settings().via}'), "
            f"master on port {q.port}, remote port {remote_port}"
        )
        sup = stack.enter_context(
            supervise(q, head.settings(remote_port=remote_port, allow_no_password=True), on_event=timeline)
        )
        if not sup.wait_until_up(30):
            print(f"demo: the tunnel did not come up: {sup.failure}")
            return 1
        for _ in range(workers):
            proc = start_worker(remote_port, max_backoff=2)
            stack.callback(terminate, proc, 2)
        for i in range(tasks):
            q.submit(Task(f"sleep 0.05; echo 'task {i} squared is' $(({i}*{i}))", tag=str(i)))
        cut_at = [tasks * (k + 1) // (cuts + 1) for k in range(cuts)]
        while not q.empty():
            result = q.wait(2)
            if result is None:
                continue
            results.setdefault(result.tag or "?", []).append(result.output.strip())
            done = sum(len(v) for v in results.values())
            if cut_at and done >= cut_at[0]:
                cut_at.pop(0)
                how = _cut(len(cut_log), sup.snapshot(), head)
                cut_log.append((how, time.time(), done))
                print(f"demo: cut the tunnel after {done} tasks: {how}")
    return _report(tasks, workers, results, cut_log, timeline, time.monotonic() - started)


def _cut(k: int, snapshot: SupervisorSnapshot, head: HeadNode) -> str:
    pid = snapshot.masters[0].tunnel.ssh_pid
    assert pid is not None
    if k % 2 == 0:
        os.kill(pid, signal.SIGKILL)
        return f"ssh client (pid {pid}) SIGKILLed"
    killed = head.kill_sessions()
    return f"head node's sshd session(s) {killed} SIGKILLed"


def _report(
    tasks: int,
    workers: int,
    results: dict[str, list[str]],
    cut_log: list[tuple[str, float, int]],
    timeline: _Timeline,
    elapsed: float,
) -> int:
    missing = [i for i in range(tasks) if str(i) not in results]
    duplicated = [t for t, outs in results.items() if len(outs) > 1]
    wrong = [t for t, outs in results.items() if t.isdigit() and outs[0] != _expected(int(t))]
    ok = not (missing or duplicated or wrong)
    print(
        f"demo: {tasks - len(missing)}/{tasks} tasks returned, {len(duplicated)} duplicated, "
        f"{len(wrong)} with wrong output, {len(missing)} missing"
    )
    for how, at, done in cut_log:
        up = next((u for u in timeline.ups if u.at > at), None)
        back = timeline.workers_back(at, workers)
        fwd = f"forward back in {up.took:.2f} s" if up else "forward NOT back"
        if up is not None and timeline.kept(at, up.at + 2.0, workers):
            wk = f"none of the {workers} workers lost its connection (the head relay resumed them)"
        elif back is not None:
            wk = f"all {workers} workers back within {back:.1f} s"
        else:
            wk = "workers not all back"
        print(f"demo: cut after {done} tasks ({how}): {fwd}; {wk}")
    print(f"demo: {'OK' if ok else 'FAILED'} in {elapsed:.1f} s")
    return 0 if ok else 1

"""The paramiko backend against the OpenSSH one, and what an in-process forwarder suffers.

    python3 benchmarks/paramiko_backend.py [--bulk-mib 256] [--bulk-rounds 3]
        [--rate-rounds 5] [--tasks 200] [--stall-rounds 3] [--out bench-out]

Three measurements, each with every path interleaved in the same run, on one
loopback sandbox head node (real sshd, real Debian Work Queue master and workers):

* bulk: MiB pushed through the head node's remote port into a sink on the
  master's port, MB/s (median); direct to the sink for reference;
* task rate: empty tasks (``true``), 2 workers that know only the remote port,
  steady rate (first to last completion) as a ratio to direct in the same round;
* stall: Debian's SWIG master (its ``wait()`` holds the GIL, like ndcctools')
  sits in back-to-back ``q.wait(5)``; from outside, a ``queue_status`` goes into
  the head's remote port and we time its answer, with the paramiko session
  running inside the application, and with the supervisor's agent running it.

The tunnels are the engine's own (paramiko's threads run in this process,
whose main thread only waits, as in the agent); the bulk sink and sender and the
masters run in child processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

from ...master import MasterInfo
from ...process import owned_argv, terminate
from ...wqserver import free_port
from ..common import PACKAGE_ROOT, machine, save, summary
from ..sandbox import HeadNode, debian_work_queue_path, workers
from .master import MasterProcess
from .tunnels import Supervised

BACKENDS = ("openssh", "paramiko")
# How long a status request may wait for its answer before it counts as unanswered.
STALL_LIMIT = 60.0
MB = 1_000_000


class Tunnel(Supervised):
    """The engine's supervised tunnel with the backend chosen."""

    def __init__(self, head: HeadNode, master_port: int, backend: str, name: str = "wqs-bench") -> None:
        self.backend = backend
        self.master_name = name
        self.name = backend
        super().__init__(head, master_port)

    async def _attach(self, head: HeadNode, master_port: int) -> Any:
        settings = head.settings(remote_port=self.remote_port, allow_no_password=True, backend=self.backend)
        return self.host.engine.attach(MasterInfo(port=master_port, name=self.master_name), settings)


def _ratio(tops: list[float], bottoms: list[float]) -> dict[str, Any]:
    """Round-by-round ratios, summarised."""
    return summary([t / b for t, b in zip(tops, bottoms, strict=True)])


def _child_env(*paths: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, *paths]), PYTHONWARNINGS="ignore")


# -- bulk ------------------------------------------------------------------------------------

# A sink that looks like a master to the supervisor's probes (it answers status
# requests with its port and name) and swallows "bulk N" uploads, answering
# "ok" once all N bytes are in. Commands on stdin: "send PORT N" uploads N
# bytes to 127.0.0.1:PORT and prints the seconds it took, up to the "ok".
_SINK = textwrap.dedent(
    """
    import json, socket, sys, threading, time
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    STATUS = json.dumps([{"port": port, "project": "wqs-bench"}]).encode()

    def serve(conn):
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            f = conn.makefile("rb")
            words = f.readline().split()
            if words and words[0] == b"bulk":
                left = int(words[1])
                while left > 0:
                    chunk = f.read1(min(left, 1 << 20))
                    if not chunk:
                        return
                    left -= len(chunk)
                conn.sendall(b"ok\\n")
            elif words and words[0] in (b"queue_status", b"resources_status"):
                conn.sendall(STATUS)
            elif words:
                conn.sendall(b"[]")

    def accept():
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print("port", port, flush=True)
    block = bytes(1 << 20)
    for line in sys.stdin:
        _, target, n = line.split()
        n = int(n)
        with socket.create_connection(("127.0.0.1", int(target))) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            s.sendall(b"bulk %d\\n" % n)
            left = n
            while left > 0:
                s.sendall(block[: min(left, len(block))])
                left -= len(block)
            answer = s.recv(16)
            took = time.perf_counter() - started
        print("took", took if answer == b"ok\\n" else -1, flush=True)
    """
)


class Sink:
    """The bulk sink and sender, in a child process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            owned_argv([sys.executable, "-c", _SINK]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_child_env(),
        )
        self.port = int(self._line("port"))

    def _line(self, key: str) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != key:
            raise RuntimeError(f"the bulk sink said {line!r}")
        return line[1]

    def send(self, port: int, nbytes: int) -> float:
        """Seconds to push ``nbytes`` into 127.0.0.1:port and hear that all of it reached the sink."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"send {port} {nbytes}\n")
        self.proc.stdin.flush()
        took = float(self._line("took"))
        if took < 0:
            raise RuntimeError(f"the upload through port {port} was cut short")
        return took

    def close(self) -> None:
        terminate(self.proc, grace=2)  # type: ignore[arg-type]


def bulk(head: HeadNode, mib: int, rounds: int, progress: Any) -> dict[str, Any]:
    """MB/s through each backend's reverse forward (and direct), interleaved."""
    nbytes = mib * 1024 * 1024
    rows: dict[str, list[float]] = {"direct": [], **{b: [] for b in BACKENDS}}
    sink = Sink()
    try:
        tunnels = {b: Tunnel(head, sink.port, b) for b in BACKENDS}
        try:
            for r in range(rounds):
                order = list(rows) if r % 2 == 0 else list(reversed(rows))
                for kind in order:
                    port = sink.port if kind == "direct" else tunnels[kind].remote_port
                    rate = nbytes / MB / sink.send(port, nbytes)
                    rows[kind].append(rate)
                    progress(f"bulk round {r + 1}/{rounds} {kind}: {rate:.0f} MB/s")
        finally:
            for t in tunnels.values():
                t.close()
    finally:
        sink.close()
    out: dict[str, Any] = {"mib": mib, "rounds": rounds, "paths": {k: summary(v) for k, v in rows.items()}}
    out["paramiko_over_openssh"] = summary(
        [p / o for p, o in zip(rows["paramiko"], rows["openssh"], strict=True)]
    )
    return out


# -- Work Queue task rate -----------------------------------------------------------------------


def _rate(kind: str, head: HeadNode, tasks: int, n_workers: int) -> float:
    with contextlib.ExitStack() as stack:
        master = MasterProcess("debian")
        stack.callback(master.close)
        port = master.port
        if kind != "direct":
            tunnel = Tunnel(head, master.port, kind)
            stack.callback(tunnel.close)
            port = tunnel.remote_port
        stack.enter_context(workers(port, n_workers))
        answer = master.send(f"workers {n_workers} 60")
        if not answer.startswith("ok"):
            raise RuntimeError(f"{kind}: workers did not connect ({answer})")
        result = master.run(tasks, "true")
    done: list[float] = sorted(result["done"])
    if len(done) != tasks:
        raise RuntimeError(f"{kind}: {len(done)} of {tasks} tasks came back")
    return (len(done) - 1) / (done[-1] - done[0])


def task_rate(head: HeadNode, rounds: int, tasks: int, n_workers: int, progress: Any) -> dict[str, Any]:
    """Steady empty-task rate per path, and each backend's ratio to direct in the same round."""
    paths = ("direct", *BACKENDS)
    rows: dict[str, list[float]] = {p: [] for p in paths}
    for r in range(rounds):
        for kind in paths if r % 2 == 0 else reversed(paths):
            rows[kind].append(_rate(kind, head, tasks, n_workers))
            progress(f"task-rate round {r + 1}/{rounds} {kind}: {rows[kind][-1]:.0f} tasks/s")
            time.sleep(0.5)
    out: dict[str, Any] = {"rounds": rounds, "tasks": tasks, "workers": n_workers, "paths": {}}
    for kind, rates in rows.items():
        entry: dict[str, Any] = {"steady": summary(rates)}
        if kind != "direct":
            entry["ratio_to_direct"] = _ratio(rates, rows["direct"])
        out["paths"][kind] = entry
    out["paramiko_over_openssh"] = summary(
        [p / o for p, o in zip(rows["paramiko"], rows["openssh"], strict=True)]
    )
    return out


# -- the stall of an in-process forwarder ------------------------------------------------------

# Debian's SWIG master with a task no worker runs, so each wait() sits out its
# timeout holding the GIL. MODE "inprocess" runs a ParamikoSession on a thread
# of this very process; "agent" lets supervise() run the tunnel in its agent.
_WAITING_APP = textwrap.dedent(
    """
    import asyncio, sys, threading, time
    import work_queue
    from wqsupervisor import Settings, supervise
    mode, backend, cfg, remote_port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    q = work_queue.WorkQueue(port=0, name="wqs-stall")
    settings = Settings(via="headnode", ssh_config=cfg, remote_port=remote_port, allow_no_password=True,
                        backend=backend)
    if mode == "inprocess":
        import tempfile
        from wqsupervisor.backends import sessions_for
        up = threading.Event()

        async def forward():
            sessions = sessions_for(settings)
            await sessions.prepare(tempfile.gettempdir(), "bench-stall")
            session = await sessions.start(master_port=q.port, remote_port=remote_port, probes=None)
            await session.established()
            up.set()
            await session.exited()

        threading.Thread(target=asyncio.run, args=(forward(),), daemon=True).start()
        assert up.wait(30), "the in-process session did not come up"
    else:
        sup = supervise(q, settings, log_events=False)
        assert sup.wait_until_up(30), sup.failure
    q.submit(work_queue.Task("sleep 100000"))
    print("ready", flush=True)
    while True:
        print("enter", time.time(), flush=True)
        q.wait(5)
    """
)


def _ask_status(port: int, timeout: float) -> float | None:
    """Seconds until queue_status through 127.0.0.1:port is answered in full; None without an answer."""
    started = time.perf_counter()
    deadline = started + timeout
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"queue_status\n")
            data = b""
            while True:
                s.settimeout(max(0.01, deadline - time.perf_counter()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        json.loads(data)
    except (OSError, ValueError):
        return None
    return time.perf_counter() - started


def _pump(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def stall(head: HeadNode, rounds: int, progress: Any) -> dict[str, Any]:
    """How long a status request through the head waits while the application sits in q.wait(5)."""
    variants = (
        ("paramiko in the application", "inprocess", "paramiko"),
        ("paramiko in the agent", "agent", "paramiko"),
    )
    rows: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    unanswered = dict.fromkeys(rows, 0)
    env = _child_env(debian_work_queue_path())
    for r in range(rounds):
        for name, mode, backend in variants if r % 2 == 0 else reversed(variants):
            remote_port = free_port()
            argv = [sys.executable, "-c", _WAITING_APP, mode, backend, str(head.ssh_config), str(remote_port)]
            app = subprocess.Popen(owned_argv(argv), stdout=subprocess.PIPE, text=True, env=env)
            lines: queue.Queue[str] = queue.Queue()
            reader = threading.Thread(target=_pump, args=(app.stdout, lines), daemon=True)
            reader.start()
            try:
                while not lines.get(timeout=60).startswith("ready"):
                    pass
                # Skip the first wait (the supervisor's first probes may still be in flight).
                for _ in range(2):
                    while not lines.get(timeout=30).startswith("enter"):
                        pass
                time.sleep(0.5)  # well inside a wait(5)
                took = _ask_status(remote_port, STALL_LIMIT)
                if took is None:
                    unanswered[name] += 1
                    progress(f"stall round {r + 1}/{rounds} {name}: no answer within {STALL_LIMIT:g} s")
                else:
                    rows[name].append(took)
                    progress(f"stall round {r + 1}/{rounds} {name}: answered after {took * 1000:.1f} ms")
            finally:
                terminate(app, grace=3)  # type: ignore[arg-type]
                reader.join(5)
    return {
        "rounds": rounds,
        "wait_seconds": 5,
        "limit_seconds": STALL_LIMIT,
        "paths": {k: {**summary(v), "unanswered": unanswered[k]} for k, v in rows.items()},
    }


# -- main --------------------------------------------------------------------------------------------


def _fmt(s: dict[str, Any], unit: str = "", scale: float = 1.0, digits: int = 0) -> str:
    if s["median"] is None:
        return "n/a"
    return (
        f"{s['median'] * scale:.{digits}f}{unit} (min {s['min'] * scale:.{digits}f}, "
        f"max {s['max'] * scale:.{digits}f}, n={s['n']})"
    )


def main(argv: list[str] | None = None) -> int:
    """``benchmarks/paramiko_backend.py``: the three measurements; figures on stdout, JSON in ``--out``."""
    parser = argparse.ArgumentParser(
        description="The paramiko backend against the OpenSSH one, and what an in-process forwarder suffers."
    )
    parser.add_argument("--bulk-mib", type=int, default=256)
    parser.add_argument("--bulk-rounds", type=int, default=3)
    parser.add_argument("--rate-rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stall-rounds", type=int, default=3)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    command = "python3 " + " ".join(sys.argv)

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    result: dict[str, Any] = {"command": command, "machine": machine()}
    with HeadNode() as head:
        result["bulk"] = bulk(head, args.bulk_mib, args.bulk_rounds, progress)
        result["task_rate"] = task_rate(head, args.rate_rounds, args.tasks, args.workers, progress)
        result["stall"] = stall(head, args.stall_rounds, progress)
    saved = save(result, args.out, "paramiko_backend.json")

    b, t, s = result["bulk"], result["task_rate"], result["stall"]
    print(f"$ {command}")
    print(f"bulk, {b['mib']} MiB through the reverse forward, MB/s, median of {b['rounds']}:")
    for kind, fig in b["paths"].items():
        print(f"  {kind:9s} {_fmt(fig, ' MB/s')}")
    print(f"  paramiko / openssh: {_fmt(b['paramiko_over_openssh'], digits=2)}")
    print(f"Work Queue empty tasks, {t['tasks']} tasks, {t['workers']} workers, steady rate:")
    for kind, fig in t["paths"].items():
        ratio = f"  / direct {_fmt(fig['ratio_to_direct'], digits=2)}" if "ratio_to_direct" in fig else ""
        print(f"  {kind:9s} {_fmt(fig['steady'], ' tasks/s')}{ratio}")
    print(f"  paramiko / openssh: {_fmt(t['paramiko_over_openssh'], digits=2)}")
    print("queue_status through the head's remote port while the application sits in q.wait(5):")
    for kind, fig in s["paths"].items():
        lost = f", {fig['unanswered']} unanswered within {STALL_LIMIT:g} s" if fig["unanswered"] else ""
        print(f"  {kind:28s} {_fmt(fig, ' ms', scale=1000, digits=1)}{lost}")
    print(f"(raw figures: {saved})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

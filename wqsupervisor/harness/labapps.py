"""What runs on the firewall lab's hosts, driven from outside the lab.

* :class:`CampusApp` -- a master with a supervised tunnel (or autossh, for the
  comparison) on ``campus``, driven line by line, reporting JSON lines;
* :func:`start_node_workers` -- node launchers on ``node``: each an ``ssh -L``
  hop to the head and a worker through it, as the HOWTO says;
* :class:`HeadProbe` -- watches, from inside ``head``, when the remote port
  reaches the master.

``python -m wqsupervisor.harness.labapps app ...`` and ``... probe PORT`` are the
two programs these start inside the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..process import owned_argv, terminate
from ..protocol import SupervisorSnapshot
from .common import PACKAGE_ROOT, queue_status
from .lab import CAMPUS, HEAD, NODE, Lab
from .sandbox import debian_work_queue_path

NODE_LOG_PREFIX = "node-launcher-"


def _python_env() -> dict[str, str]:
    path = os.pathsep.join(
        p for p in (PACKAGE_ROOT, debian_work_queue_path(), os.environ.get("PYTHONPATH")) if p
    )
    return dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore")


class CampusApp:
    """A supervised master on ``campus`` (``python -m wqsupervisor.harness.labapps app``), driven from here.

    It reports JSON lines (events with the engine's own timestamps, results,
    stats every half second); this object collects them and waits on them.
    """

    def __init__(
        self,
        lab: Lab,
        remote_port: int,
        settings: dict[str, Any] | None = None,
        binding: str = "debian",
        tunnel: str = "wqsupervisor",
    ) -> None:
        self.lab = lab
        self.remote_port = remote_port
        self._cond = threading.Condition()
        self.events: list[dict[str, Any]] = []
        self.results: dict[str, list[str]] = {}
        self.stats: list[tuple[float, dict[str, int]]] = []
        self._replies: list[dict[str, Any]] = []
        self.submitted_at: list[float] = []
        """When the application had submitted each batch of tasks (its own clock)."""
        self.ready: dict[str, Any] | None = None
        argv = [
            sys.executable,
            "-m",
            "wqsupervisor.harness.labapps",
            "app",
            "--ssh-config",
            str(lab.campus_ssh_config),
            "--remote-port",
            str(remote_port),
            "--settings",
            json.dumps(settings or {}),
            "--binding",
            binding,
            "--tunnel",
            tunnel,
        ]
        self.log = lab.root / f"campus-{remote_port}.log"
        with open(self.log, "ab") as log:
            self.proc = lab.popen(
                CAMPUS,
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=_python_env(),
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_for(lambda: self.ready is not None, 60, "the campus application to start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                kind = msg.get("kind")
                if kind == "event":
                    self.events.append(msg["data"])
                elif kind == "result":
                    self.results.setdefault(msg["tag"], []).append(msg["output"])
                elif kind == "stats":
                    self.stats.append((msg["t"], msg["stats"]))
                elif kind == "ready":
                    self.ready = msg
                elif kind == "submitted":
                    self.submitted_at.append(msg["t"])
                else:
                    self._replies.append(msg)
                self._cond.notify_all()

    def send(self, command: str) -> None:
        """Send one command line to the application."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Wait until ``predicate()`` is true (checked whenever a line arrives)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (value := predicate()):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""
                    events = "\n".join(json.dumps(e, default=str) for e in self.events[-8:])
                    raise TimeoutError(
                        f"waited {timeout} s for {what}; the application's stderr:\n{tail}\n"
                        f"its last events:\n{events}\n{node_logs(self.lab)}"
                    )
                self._cond.wait(min(left, 0.5))
            return value

    def submit(self, n: int, command: str = "echo out-{i}") -> None:
        """Submit n tasks; ``{i}`` in the command becomes the task's tag."""
        self.send(f"submit {n} {command}")

    def adapt(self, minimum: int, maximum: int) -> None:
        """Change the worker limits through the drop-in handle (``sup.adapt``)."""
        self.send(f"adapt {minimum} {maximum}")

    def submit_now(self, n: int, command: str = "echo out-{i}", timeout: float = 10.0) -> float:
        """Submit n tasks and return when the application had submitted them (its own clock).

        The application reads its commands between two ``wait()`` calls, so
        this is later than the command was sent: the moment the backlog is
        there, and the start of a time to first task.
        """
        count = len(self.submitted_at)
        self.submit(n, command)
        self.wait_for(lambda: len(self.submitted_at) > count, timeout, "the tasks to be submitted")
        return self.submitted_at[count]

    def named(self, name: str, after: float = 0.0) -> list[dict[str, Any]]:
        """Events called ``name`` that happened after wall time ``after``."""
        with self._cond:
            return [e for e in self.events if e["event"] == name and e["at"] >= after]

    def wait_event(self, name: str, timeout: float, after: float = 0.0) -> dict[str, Any]:
        """The first event called ``name`` after ``after``, waiting up to ``timeout``."""
        found: list[dict[str, Any]] = self.wait_for(lambda: self.named(name, after), timeout, f"event {name}")
        return found[0]

    def done(self) -> int:
        """How many results came back."""
        with self._cond:
            return sum(len(v) for v in self.results.values())

    def wait_done(self, n: int, timeout: float) -> None:
        """Wait until n results came back."""
        self.wait_for(lambda: self.done() >= n, timeout, f"{n} results")

    def latest_stats(self) -> dict[str, int]:
        """The last stats line."""
        with self._cond:
            return self.stats[-1][1] if self.stats else {}

    def wait_workers(self, n: int, timeout: float, after: float = 0.0) -> float:
        """Wall time of the first stats line after ``after`` with n workers connected."""

        def seen() -> float | None:
            for t, s in self.stats:
                if t >= after and s.get("workers_connected", 0) >= n:
                    return t
            return None

        found: float = self.wait_for(seen, timeout, f"{n} connected workers")
        return found

    def snapshot(self, timeout: float = 30.0) -> SupervisorSnapshot:
        """The supervisor's snapshot, as the application's handle sees it."""
        with self._cond:
            count = len(self._replies)
        self.send("snapshot")
        self.wait_for(lambda: len(self._replies) > count, timeout, "a snapshot")
        with self._cond:
            return SupervisorSnapshot.from_dict(self._replies[count]["data"])

    def close(self) -> None:
        """Ask the application to close its supervisor and exit; kill it if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send("quit")
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                terminate(self.proc, grace=2)


class HeadProbe:
    """Watches the head node's remote port from inside the head: when does it reach the master?"""

    def __init__(self, lab: Lab, port: int, interval: float = 0.05) -> None:
        self.transitions: list[tuple[float, bool]] = []
        self._lock = threading.Lock()
        self.proc = lab.popen(
            HEAD,
            [sys.executable, "-m", "wqsupervisor.harness.labapps", "probe", str(port), str(interval)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=_python_env(),
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError, KeyError):
                msg = json.loads(line)
                with self._lock:
                    self.transitions.append((float(msg["t"]), bool(msg["answering"])))

    def recovered(self, since: float) -> float | None:
        """When the port answered again after ``since`` (``since`` itself if it never stopped).

        Answering at ``since``: the end of the first break after it, if any.
        Not answering at ``since``: the first answer after it. None: not yet.
        """
        with self._lock:
            history = list(self.transitions)
        before = [a for t, a in history if t < since]
        after = [(t, a) for t, a in history if t >= since]
        if before and before[-1]:
            breaks = [t for t, a in after if not a]
            if not breaks:
                return since
            after = [(t, a) for t, a in after if t > breaks[0]]
        return next((t for t, a in after if a), None)

    def close(self) -> None:
        """Stop probing."""
        terminate(self.proc, grace=1)


def start_node_workers(
    lab: Lab,
    remote_port: int,
    n: int = 1,
    *,
    idle_timeout: int = 600,
    cores: int = 1,
    extra: Sequence[str] = (),
    via: str = "headnode",
    also_via: Sequence[str] = (),
    worker: str = "work_queue_worker",
    peer_transfers: bool = False,
    resume_hop: bool = False,
) -> list[subprocess.Popen[Any]]:
    """n node launchers on ``node``, each an ssh -L hop to ``via`` (or to ``also_via``) and a worker
    (``worker``; a TaskVine one with ``peer_transfers``, see :class:`~wqsupervisor.launcher.NodeLauncher`)."""
    from ..launcher import NodeLauncher

    launcher = NodeLauncher(
        remote_port=remote_port,
        via=via,
        also_via=tuple(also_via),
        ssh_args=["-F", str(lab.node_ssh_config)],
        idle_timeout=idle_timeout,
        cores=cores,
        memory_mb=512,
        disk_mb=1024,
        worker=worker,
        peer_transfers=peer_transfers,
        worker_args=tuple(extra),
        resume_hop=resume_hop,
    )
    script = launcher.write(lab.root / f"launch-{remote_port}.sh")
    procs = []
    for i in range(n):
        # Each launcher's own log (its hops, their failures), quoted when a wait times out.
        with open(lab.root / f"{NODE_LOG_PREFIX}{remote_port}-{i}.log", "ab") as log:
            proc = lab.popen(NODE, ["sh", str(script)], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        procs.append(proc)
    return procs


def node_logs(lab: Lab, chars: int = 600) -> str:
    """The end of every node launcher's log in the lab, for a failure's message."""
    parts = []
    for path in sorted(lab.root.glob(f"{NODE_LOG_PREFIX}*.log")):
        text = path.read_text(errors="replace")[-chars:]
        parts.append(f"--- {path.name}:\n{text}")
    return "\n".join(parts)


# -- the campus-side application and a prober, run inside namespaces -----------------------


def _autossh(monitor: bool) -> Callable[[str, int, int], tuple[list[str], dict[str, str]]]:
    def command(ssh_config: str, remote_port: int, master_port: int) -> tuple[list[str], dict[str, str]]:
        forward = [
            "-o",
            "ExitOnForwardFailure=yes",
            "-N",
            "-R",
            f"127.0.0.1:{remote_port}:localhost:{master_port}",
        ]
        if monitor:
            # (c) autossh's own monitor ports and its defaults (poll every 600 s).
            return ["autossh", "-M", str(remote_port + 10000), "-F", ssh_config, *forward, "headnode"], {}
        # (b) -M 0 with ssh's keepalives, restarted whatever the exit.
        keepalive = ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3"]
        argv = ["autossh", "-M", "0", "-F", ssh_config, *keepalive, *forward, "headnode"]
        return argv, {"AUTOSSH_GATETIME": "0"}

    return command


# Who keeps a comparator's tunnel in the lab app: autossh as people run it today.
TUNNELS: dict[str, Callable[[str, int, int], tuple[list[str], dict[str, str]]] | None] = {
    "wqsupervisor": None,
    "autossh-M0": _autossh(monitor=False),
    "autossh-monitor": _autossh(monitor=True),
}


def _app(argv: list[str]) -> int:
    """A master with a supervised tunnel, driven by stdin, reporting JSON lines on stdout."""
    import argparse
    import queue

    parser = argparse.ArgumentParser(prog="python -m wqsupervisor.harness.labapps app")
    parser.add_argument("--ssh-config", required=True)
    parser.add_argument("--remote-port", type=int, required=True)
    parser.add_argument("--settings", default="{}", help="more supervisor settings, as JSON")
    parser.add_argument("--binding", default="debian", choices=("debian", "server"))
    parser.add_argument(
        "--tunnel",
        default="wqsupervisor",
        choices=sorted(TUNNELS),
        help="who keeps the tunnel: wqsupervisor, or autossh as the HOWTO's users run it",
    )
    args = parser.parse_args(argv)

    from ..config import settings_from_kwargs
    from ..master import read_stats
    from ..supervisor import supervise

    lock = threading.Lock()

    def say(kind: str, **data: Any) -> None:
        with lock:
            print(json.dumps({"kind": kind, "t": time.time(), **data}), flush=True)

    if args.binding == "server":
        from ..wqserver import Task, WorkQueueServer

        q: Any = WorkQueueServer(name=f"lab-{os.getpid()}")
        make_task: Callable[[str, str], Any] = lambda cmd, tag: Task(cmd, tag=tag)  # noqa: E731
    else:
        import work_queue

        if debug_dir := os.environ.get("WQS_LAB_MASTER_DEBUG"):
            # Diagnostics: the master's own account of every worker it keeps or drops.
            work_queue.cctools_debug_flags_set("wq")
            work_queue.cctools_debug_config_file(f"{debug_dir}/master-{args.tunnel}-{os.getpid()}.log")
        q = work_queue.WorkQueue(port=0, name=f"lab-{os.getpid()}")

        def make_task(cmd: str, tag: str) -> Any:
            t = work_queue.Task(cmd)
            t.specify_tag(tag)
            return t

    sup: Any = None
    autossh: subprocess.Popen[bytes] | None = None
    if args.tunnel == "wqsupervisor":
        settings = settings_from_kwargs(
            {
                "via": "headnode",
                "ssh_config": args.ssh_config,
                "remote_port": args.remote_port,
                "allow_no_password": True,
                **json.loads(args.settings),
            }
        )
        sup = supervise(q, settings, on_event=lambda e: say("event", data=e.to_dict()), log_events=False)
    else:
        make = TUNNELS[args.tunnel]
        assert make is not None
        argv_, env = make(args.ssh_config, args.remote_port, q.port)
        autossh = subprocess.Popen(
            owned_argv(argv_),
            env=dict(os.environ, **env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    commands: queue.Queue[str] = queue.Queue()

    def read_commands() -> None:
        for text in sys.stdin:
            commands.put(text)

    threading.Thread(target=read_commands, daemon=True).start()
    say(
        "ready",
        master_port=q.port,
        agent_pid=sup._agent.pid if sup and sup._agent else None,
        autossh_pid=autossh.pid if autossh else None,
    )
    outstanding = 0
    next_tag = 0
    last_stats = 0.0
    while True:
        with contextlib.suppress(queue.Empty):
            while line := commands.get_nowait().split():
                if line[0] == "quit":
                    if sup is not None:
                        sup.close()
                    if autossh is not None:
                        terminate(autossh, grace=3)
                    say("closed")
                    return 0
                if line[0] == "submit":
                    for _ in range(int(line[1])):
                        tag = str(next_tag)
                        q.submit(make_task(" ".join(line[2:]).replace("{i}", tag), tag))
                        next_tag += 1
                        outstanding += 1
                    say("submitted", n=int(line[1]))
                elif line[0] == "busy":
                    say("busy", seconds=float(line[1]))
                    time.sleep(float(line[1]))
                    say("idle")
                elif line[0] == "adapt" and sup is not None:
                    sup.adapt(int(line[1]), int(line[2]))
                elif line[0] == "snapshot" and sup is not None:
                    say("snapshot", data=sup.snapshot().to_dict())
        if outstanding:
            result = q.wait(1)
            if result is not None:
                outstanding -= 1
                output = result.output if isinstance(result.output, str) else ""
                say(
                    "result",
                    tag=result.tag,
                    output=output.strip(),
                    status=getattr(result, "return_status", None),
                )
        else:
            # An idle master still takes its connections (status probes, workers), as a
            # real application's loop does: otherwise they wait in its accept queue.
            q.wait(1)
        if time.monotonic() - last_stats > 0.5:
            last_stats = time.monotonic()
            say("stats", stats=read_stats(q).to_dict())


def _probe(argv: list[str]) -> int:
    """Print a line each time the master on 127.0.0.1:PORT starts or stops answering its status."""
    port, interval = int(argv[0]), float(argv[1]) if len(argv) > 1 else 0.05
    answering: bool | None = None
    while True:
        reply = queue_status(port, timeout=0.5)
        now = reply is not None
        if now != answering:
            print(
                json.dumps({"t": time.time(), "answering": now, "port": (reply or {}).get("port")}),
                flush=True,
            )
            answering = now
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    """``app ...`` or ``probe PORT [INTERVAL]``, as the lab starts them inside its namespaces."""
    args = sys.argv[1:] if argv is None else argv
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command == "app":
        return _app(rest)
    if command == "probe":
        return _probe(rest)
    print("usage: python -m wqsupervisor.harness.labapps {app|probe} ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

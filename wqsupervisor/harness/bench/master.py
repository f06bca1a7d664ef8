"""A Work Queue master in a process of its own, driven line by line from stdin.

``python -m wqsupervisor.harness.bench.master BINDING`` prints its port, then serves:

* ``workers K T`` -- wait (in ``wait()``, so status requests are answered) until
  K workers are connected, at most T seconds; prints ``ok N`` or ``timeout N``;
* ``serve T`` -- sit in ``wait()`` for T seconds (keeps status answered);
* ``run N CMD... [--input PATH]`` -- submit N tasks running CMD (each sent the
  file PATH as ``input.dat``, uncached, so every task moves its bytes), wait for
  all, print a JSON line with the submit time, each completion time, and how
  many failed;
* ``quit``.

:class:`MasterProcess` starts it and drives it from the benchmark.

BINDING is ``debian`` (Debian's SWIG ``work_queue``), ``ndcctools``,
``taskvine`` (a TaskVine manager, ``ndcctools.taskvine``), or ``server``
(:class:`wqsupervisor.wqserver.WorkQueueServer`). Answers start with
``wqs-bench: ``; anything else on stdout is the bindings' own chatter.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any

from ...process import owned_argv, terminate
from ..common import PACKAGE_ROOT

PREFIX = "wqs-bench: "


def _open(binding: str) -> tuple[Any, Any]:
    import importlib

    if binding == "server":
        from wqsupervisor.wqserver import Task, WorkQueueServer

        return WorkQueueServer(name="wqs-bench"), Task
    if binding == "taskvine":
        import tempfile

        import ndcctools.taskvine as vine

        # (its run-info directory would otherwise go where the benchmark runs)
        info = tempfile.mkdtemp(prefix="wqs-bench-vine-")
        return vine.Manager(port=0, name="wqs-bench", run_info_path=info), vine.Task
    module = importlib.import_module("ndcctools.work_queue" if binding == "ndcctools" else "work_queue")
    return module.WorkQueue(port=0, name="wqs-bench"), module.Task


def _task(task_type: Any, command: str, input_path: str | None) -> Any:
    """One task; with ``input_path``, the file goes to the worker for every task (no cache)."""
    if input_path is None:
        return task_type(command)
    if task_type.__module__.startswith("ndcctools.taskvine"):
        raise ValueError("--input is not supported with the taskvine binding (its files need the manager)")
    if hasattr(task_type, "specify_input_file"):
        task = task_type(command)
        task.specify_input_file(input_path, "input.dat", cache=False)
        return task
    return task_type(command, input_files=[(input_path, "input.dat")])


def _failed(task: Any) -> bool:
    """A task that came back without success (a task whose input did not arrive comes back, failed)."""
    successful = getattr(task, "successful", None)
    if callable(successful):  # TaskVine's: its result is a word ("success"), not a number
        return not successful()
    return bool(getattr(task, "result", 0) or getattr(task, "return_status", 0))


def split_run(words: list[str]) -> tuple[int, str, str | None]:
    """``run N CMD... [--input PATH]`` -> (N, CMD, PATH or None)."""
    rest, input_path = words[2:], None
    if len(rest) >= 2 and rest[-2] == "--input":
        rest, input_path = rest[:-2], rest[-1]
    return int(words[1]), " ".join(rest), input_path


def _say(what: object) -> None:
    # The bindings print their own warnings on stdout; answers carry a prefix.
    print(f"{PREFIX}{what}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Serve commands from stdin until ``quit`` or end of file."""
    binding = (argv if argv is not None else sys.argv[1:])[0]
    q, task_type = _open(binding)
    _say(q.port)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        if words[0] == "workers":
            want, limit = int(words[1]), float(words[2])
            deadline = time.monotonic() + limit
            while q.stats.workers_connected < want and time.monotonic() < deadline:
                q.wait(1)
            have = q.stats.workers_connected
            _say(("ok " if have >= want else "timeout ") + str(have))
        elif words[0] == "serve":
            until = time.monotonic() + float(words[1])
            while time.monotonic() < until:
                q.wait(1)
            _say("ok")
        elif words[0] == "run":
            n, command, input_path = split_run(words)
            submitted = time.monotonic()
            for _ in range(n):
                q.submit(_task(task_type, command, input_path))
            done: list[float] = []
            failed = 0
            while not q.empty():
                task = q.wait(5)
                if task is not None:
                    done.append(time.monotonic())
                    failed += _failed(task)
            _say(json.dumps({"submitted": submitted, "done": done, "failed": failed}))
    if hasattr(q, "close"):
        q.close()
    return 0


class MasterProcess:
    """This program in a child process, driven from the benchmark."""

    def __init__(self, binding: str = "debian", pythonpath: str | None = None) -> None:
        # Imported here: the master program itself needs none of the harness.
        from ..sandbox import debian_work_queue_path

        paths = [PACKAGE_ROOT]
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


if __name__ == "__main__":
    sys.exit(main())

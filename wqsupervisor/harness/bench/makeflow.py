"""Debian's ``makeflow -T wq`` as a benchmark master: a workflow of independent rules.

Makeflow runs its Work Queue master in C, in its own process; the supervisor
serves it as ``attach`` does, by port. Each rule runs a command and touches
its target (which Work Queue brings back, as it brings back any rule's
output); completions are read from Makeflow's own log, where each line is
``TIMESTAMP_US NODE STATE ...`` and state 2 is "complete".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ...children import port_listening
from ...process import owned_argv, terminate
from ...wqserver import free_port
from .. import common

# Debian's makeflow is linked with Open MPI, whose MPI_Init wants orted (openmpi-bin)
# unless a lone process may start by itself.
ENV = {"OMPI_MCA_ess_singleton_isolated": "1"}
COMPLETE = "2"


def program() -> str:
    """Debian's makeflow (coop-computing-tools), or RuntimeError saying what to install."""
    found = shutil.which("makeflow")
    if found is None:
        raise RuntimeError("makeflow is not installed: apt-get install coop-computing-tools")
    return found


def worker_program() -> str:
    """The ``work_queue_worker`` of makeflow's own build (its worker protocol)."""
    return os.path.join(os.path.dirname(program()), "work_queue_worker")


def version() -> str:
    """``makeflow -v``'s first line."""
    return common.version([program(), "-v"], env={**os.environ, **ENV})


class MakeflowMaster:
    """``makeflow -T wq -p PORT`` on ``rules`` independent rules of ``command``, in a directory of its own."""

    def __init__(self, rules: int, command: str = "true") -> None:
        self.rules = rules
        self.folder = Path(tempfile.mkdtemp(prefix="wqs-bench-makeflow-"))
        text = "".join(f"r.{i}:\n\t{command}; touch r.{i}\n\n" for i in range(rules))
        (self.folder / "Makeflow").write_text(text)
        self.port = free_port()
        argv = [program(), "-T", "wq", "-p", str(self.port), "Makeflow"]
        with open(self.folder / "makeflow.out", "wb") as out:
            self.proc = subprocess.Popen(
                owned_argv(argv),
                cwd=self.folder,
                env={**os.environ, **ENV},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not port_listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"makeflow did not listen on {self.port}: {self._tail()}")
            time.sleep(0.05)

    def _tail(self) -> str:
        try:
            return (self.folder / "makeflow.out").read_text()[-500:]
        except OSError:
            return "(no output)"

    def completions(self, timeout: float = 600.0) -> list[float]:
        """Wait for the workflow to end (0, or RuntimeError); each rule's completion time, in seconds."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"makeflow did not finish in {timeout} s") from None
        if status != 0:
            raise RuntimeError(f"makeflow exited with {status}: {self._tail()}")
        done = []
        for line in (self.folder / "Makeflow.makeflowlog").read_text().splitlines():
            fields = line.split()
            if not line.startswith("#") and len(fields) > 2 and fields[2] == COMPLETE:
                done.append(int(fields[0]) / 1e6)
        if len(done) != self.rules:
            raise RuntimeError(f"makeflow's log has {len(done)} of {self.rules} rules complete")
        return sorted(done)

    def close(self) -> None:
        """Stop makeflow (if it still runs) and remove its directory."""
        terminate(self.proc, grace=5)
        shutil.rmtree(self.folder, ignore_errors=True)

"""cctools' ``work_queue_factory`` (``vine_factory`` for a TaskVine manager), run on the head node
and pointed at the forwarded port.

For people who already use the factory: it keeps its own worker count (its
``--min-workers``/``--max-workers``), asks the master for its backlog through
the remote port on the head's loopback, and submits to its own batch type.
Its workers would connect to the address it queries (``127.0.0.1`` on the
head, wrong on a compute node), so it is given the node launcher as its
``--worker-binary``: each worker job builds its own ``ssh -L`` hop to the head
and runs the real worker through it, whatever arguments the factory passes.

The factory process is owned like an ssh worker: it runs in an ssh session
(an exec channel with the paramiko backend) and stops when the session ends
(cancelled, or the supervisor gone). It is not
driven by wqsupervisor's scaling policy; ``adapt`` restarts it with new limits.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from ..launcher import NodeLauncher
from .base import JobState
from .local import Processes

_WRAPPER = """\
#!/bin/sh
# wqsupervisor: run the factory for as long as this ssh session lasts; its log beside this script.
exec 3<&0
%(factory)s </dev/null >"$(dirname "$0")/factory.log" 2>&1 &
factory=$!
( cat <&3 >/dev/null 2>&1; kill "$factory" 2>/dev/null ) &
wait "$factory"
"""


class Factory(Processes):
    """One ``work_queue_factory`` on the head node (its "job" is the factory itself)."""

    name = "factory"
    program = "work_queue_factory"
    """vine_factory for a TaskVine manager (its flags used here are the same)."""
    batch_type = "local"
    min_workers = 0
    max_workers = 4
    idle_timeout = 60

    def factory_argv(self, remote_port: int) -> list[str]:
        """The factory's command line on the head node."""
        assert self.workdir is not None
        argv = [
            self.program,
            "-T",
            self.batch_type,
            "--min-workers",
            str(self.min_workers),
            "--max-workers",
            str(self.max_workers),
            "--timeout",
            str(self.idle_timeout),
            "--cores",
            str(self.options.cores),
            "--worker-binary",
            f"{self.workdir}/launcher.sh",
            "--scratch-dir",
            f"{self.workdir}/factory",
        ]
        if self.options.memory_mb:
            argv += ["--memory", str(self.options.memory_mb)]
        batch = [d for d in self.options.directives]
        if self.options.partition:
            batch.append(f"--partition={self.options.partition}")
        if batch:
            argv += ["--batch-options", " ".join(batch)]
        return [*argv, "127.0.0.1", str(remote_port)]

    async def prepare(self, launcher: NodeLauncher, password: bytes | None = None) -> None:
        """Write the launcher (the factory's worker binary) and the session wrapper."""
        await super().prepare(launcher, password)
        factory = " ".join(shlex.quote(a) for a in self.factory_argv(launcher.remote_port))
        await self.runner.write(f"{self.workdir}/factory-job.sh", _WRAPPER % {"factory": factory}, 0o700)

    def command(self) -> list[str]:
        """The factory in its wrapper, on the head node (the runner starts it there)."""
        return ["sh", f"{self.workdir}/factory-job.sh"]

    async def states(self, ids: Sequence[str]) -> dict[str, JobState]:
        """The factory process's state."""
        return await super().states(ids)

    def describe(self) -> dict[str, Any]:
        """For status output."""
        return {**super().describe(), "batch_type": self.batch_type}

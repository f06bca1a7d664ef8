"""Workers on the head node itself, over ssh; they reach the forwarded port on its loopback.

Each job is an ssh session running a small wrapper around the node
launcher: the launcher runs in the background while ``cat`` reads the
session's input, so the launcher is stopped as soon as the session ends,
whether the job was cancelled or the supervisor died (its ssh dies with it).
With the paramiko backend the session is an exec channel of the runner's
connection, which ends the same ways. Nothing is left on the head node.
"""

from __future__ import annotations

from ..launcher import NodeLauncher
from .local import Processes

_WRAPPER = """\
#!/bin/sh
# wqsupervisor: run the node launcher for as long as this ssh session lasts.
# A background job's input is /dev/null in sh: keep the session's on fd 3 for cat.
exec 3<&0
sh "$(dirname "$0")/launcher.sh" </dev/null &
launcher=$!
( cat <&3 >/dev/null 2>&1; kill "$launcher" 2>/dev/null ) &
wait "$launcher"
status=$?
exit $status
"""


class HeadNodeWorkers(Processes):
    """Workers started on the head node over ssh, owned by the supervisor."""

    name = "ssh"

    async def prepare(self, launcher: NodeLauncher, password: bytes | None = None) -> None:
        """Write the launcher and its session wrapper on the head node."""
        await super().prepare(launcher, password)
        await self.runner.write(f"{self.workdir}/ssh-job.sh", _WRAPPER, 0o700)

    def command(self) -> list[str]:
        """The node launcher's wrapper, on the head node (the runner starts it there)."""
        return ["sh", f"{self.workdir}/ssh-job.sh"]

"""Workers on this machine: the node launcher as local processes, owned and reaped.

Each job is one ``sh launcher.sh`` process that dies with the supervisor
(``PR_SET_PDEATHSIG``); its id is ``local-PID``. Cancelling sends SIGTERM,
which the launcher turns into a clean stop of its worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Sequence

from ..process import owned_argv, reap
from .base import BatchSystem, JobState


class Processes(BatchSystem):
    """Jobs that are processes started by this supervisor (local, or ssh to the head node)."""

    name = "processes"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._cancelled: set[str] = set()
        self._serial = 0

    def command(self) -> list[str]:
        """The command of one job."""
        return ["sh", str(self.launcher_path)]

    async def submit(self, count: int) -> list[str]:
        """Start ``count`` launcher processes."""
        ids = []
        for _ in range(count):
            proc = await asyncio.create_subprocess_exec(
                *owned_argv(self.command()),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
            self._serial += 1
            job = f"{self.name}-{proc.pid}"
            self._procs[job] = proc
            ids.append(job)
        return ids

    async def cancel(self, ids: Sequence[str]) -> None:
        """Stop the jobs: end of input, then SIGTERM, then SIGKILL after 10 s."""
        for job in ids:
            proc = self._procs.get(job)
            if proc is None or proc.returncode is not None:
                continue
            self._cancelled.add(job)
            if proc.stdin is not None:
                proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for job in ids:
            proc = self._procs.get(job)
            if proc is not None:
                await reap(proc, 10)

    async def states(self, ids: Sequence[str]) -> dict[str, JobState]:
        """Running while the process lives; done or failed by its exit status."""
        out: dict[str, JobState] = {}
        for job in ids:
            proc = self._procs.get(job)
            if proc is None:
                continue
            if proc.returncode is None:
                out[job] = JobState.RUNNING
            elif job in self._cancelled:
                out[job] = JobState.CANCELLED
            else:
                out[job] = JobState.DONE if proc.returncode == 0 else JobState.FAILED
        return out

    async def close(self) -> None:
        """Stop whatever still runs, then remove the launcher."""
        await self.cancel(list(self._procs))
        await super().close()


class Local(Processes):
    """Workers on this machine."""

    name = "local"

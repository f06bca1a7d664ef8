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

from .base import BatchSystem, JobState, Lasting


class Processes(BatchSystem):
    """Jobs that are processes started by this supervisor (local, or ssh to the head node)."""

    name = "processes"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._procs: dict[str, Lasting] = {}
        self._cancelled: set[str] = set()
        self._serial = 0

    def command(self) -> list[str]:
        """The command of one job, on the side where jobs start (the runner's)."""
        return ["sh", str(self.launcher_path)]

    async def submit(self, count: int) -> list[str]:
        """Start ``count`` jobs through the runner (:meth:`~wqsupervisor.batch.base.Runner.start`)."""
        ids = []
        for _ in range(count):
            proc = await self.runner.start(self.command())
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
            if proc is not None and proc.returncode is None:
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()

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

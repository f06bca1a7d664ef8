"""A scheduler that cannot be asked leaks no job: HTCondor, PBS, Torque and Grid Engine.

None of these schedulers is installed here, so their commands fail for real
on a real head node: a real sshd on loopback (the ``head`` fixture), reached
by the real :class:`SshRunner`. The faults are the ones a cluster has: the
command is not there (exit 127), it fails (a stand-in client on the head's
PATH that exits 1 with the scheduler's own words for a dead server), sshd is
stopped, or nothing listens on the port. The real :class:`JobTracker` and
scaling policy run with an injected clock, seeded with jobs "already
submitted", across several rounds past the 30 s after which a job the
scheduler stops listing counted as finished. Before the fix HTCondor and
Grid Engine answered "no jobs" and PBS ignored qstat's status: the jobs were
marked done and replacements submitted. (Slurm, which runs here for real, is
in ``tests/test_scaling.py``.)
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from wqsupervisor.batch.base import BatchSystem, JobState, SshRunner
from wqsupervisor.batch.condor import Condor
from wqsupervisor.batch.pbs import Pbs, Torque
from wqsupervisor.batch.scheduler import Scheduler
from wqsupervisor.batch.sge import Sge
from wqsupervisor.clock import ManualClock
from wqsupervisor.events import Event, JobsSubmitted, JobStateChanged, JobSubmitFailed
from wqsupervisor.harness.sandbox import HeadNode
from wqsupervisor.jobs import Job, JobTracker
from wqsupervisor.launcher import NodeLauncher
from wqsupervisor.master import MasterStats
from wqsupervisor.policy import ScalingSettings

from support import free_port

# Two jobs wanted (min_workers), two on their way: the policy has nothing to add unless
# the jobs are taken for finished.
SCALING = ScalingSettings(min_workers=2, max_workers=2, max_per_cycle=2, max_pending=2, cooldown=0.0)


@dataclass(frozen=True)
class Case:
    """A scheduler, the ids of two of its jobs, and how its state command fails when its server is down."""

    cls: type[Scheduler]
    ids: tuple[str, str]
    program: str
    dead_server: str


CASES = [
    Case(Condor, ("6.0", "6.1"), "condor_q", "-- Failed to fetch ads from: <192.0.2.1:9618> : head"),
    Case(Pbs, ("1004.pbs", "1006.pbs"), "qstat", "qstat: cannot connect to server pbs (errno=15010)"),
    Case(
        Torque,
        ("667999.superserver.stanford.edu", "665199.superserver.stanford.edu"),
        "qstat",
        "Communication failure.\nqstat: cannot connect to server superserver (errno=111) Connection refused",
    ),
    Case(
        Sge,
        ("1212299", "1212322"),
        "qstat",
        "error: commlib error: got select error (Connection refused)\n"
        'error: unable to send message to qmaster using port 6444 on host "head": got send error',
    ),
]
FAULTS = ["not installed", "failing", "sshd stopped", "nothing listening"]


@pytest.fixture(autouse=True)
def no_scheduler_here() -> None:
    """These tests rely on no scheduler being installed on this machine (the head node)."""
    for program in ("condor_q", "qstat", "qsub", "condor_submit"):
        assert shutil.which(program) is None, f"{program} is installed: this test needs it absent"


def failing_client(directory: Path, program: str, words: str) -> dict[str, str]:
    """A stand-in scheduler client that says ``words`` and exits 1; the env that puts it first on PATH."""
    directory.mkdir(exist_ok=True)
    script = directory / program
    quoted = words.replace("'", "'\\''")
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{quoted}' >&2\nexit 1\n")
    script.chmod(0o755)
    return {"PATH": f"{directory}:/usr/bin:/bin"}


class Outage:
    """One fault of the head node or its scheduler, applied to a prepared system and undone after."""

    def __init__(self, fault: str, case: Case, head: HeadNode, system: BatchSystem, tmp: Path) -> None:
        self.fault, self.case, self.head, self.system, self.tmp = fault, case, head, system, tmp
        self.runner = system.runner

    def __enter__(self) -> Outage:
        target = self.head.settings().ssh_target()
        if self.fault == "failing":
            env = failing_client(self.tmp / "bin", self.case.program, self.case.dead_server)
            self.system.runner = SshRunner(target, env)
        elif self.fault == "sshd stopped":
            self.head.stop()
        elif self.fault == "nothing listening":
            self.system.runner = SshRunner(replace(target, port=free_port()))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fault == "sshd stopped":
            self.head.start()
        self.system.runner = self.runner

    @property
    def says(self) -> str:
        """The start of the reason Unavailable gives for this fault."""
        program = self.case.program
        return {
            "not installed": f"{program} is not there (not installed, or not on PATH)",
            "failing": f"{program} failed: " + " / ".join(self.case.dead_server.splitlines()),
            "sshd stopped": f"the head node could not be reached to run {program}",
            "nothing listening": f"the head node could not be reached to run {program}",
        }[self.fault]


@pytest.fixture
def events() -> list[Event]:
    """What the tracker emits."""
    return []


def seeded(system: BatchSystem, ids: tuple[str, str], clock: ManualClock, events: list[Event]) -> JobTracker:
    """A tracker whose two jobs were submitted a minute ago: one queued, one running."""
    tracker = JobTracker(
        system=system,
        scaling=SCALING,
        launcher=NodeLauncher(remote_port=9123, via="headnode"),
        emit=events.append,
        stats=MasterStats,
        tunnel_up=lambda: True,
        source="test",
        clock=clock,
    )
    then = clock.monotonic() - 60.0
    tracker.jobs = {
        ids[0]: Job(ids[0], JobState.PENDING, then, then, clock.monotonic()),
        ids[1]: Job(ids[1], JobState.RUNNING, then, then, clock.monotonic()),
    }
    return tracker


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.cls.name)
def test_no_job_is_marked_done_nor_replaced_while_the_scheduler_cannot_be_asked(
    case: Case, fault: str, head: HeadNode, tmp_path: Path, events: list[Event]
) -> None:
    """Five rounds over 75 s of outage: states kept, nothing submitted, Unavailable logged once with its cause."""

    async def scenario() -> None:
        clock = ManualClock()
        system = case.cls(SshRunner(head.settings().ssh_target()))
        tracker = seeded(system, case.ids, clock, events)
        await system.prepare(tracker.launcher)
        try:
            with capture_logs() as logs, Outage(fault, case, head, system, tmp_path) as outage:
                for _ in range(5):
                    clock.advance(15.0)
                    await tracker.step()
            assert {job.id: job.state for job in tracker.jobs.values()} == {
                case.ids[0]: JobState.PENDING,
                case.ids[1]: JobState.RUNNING,
            }
            assert not [e for e in events if isinstance(e, JobsSubmitted | JobSubmitFailed | JobStateChanged)]
            assert tracker.submitted == 0
            said = [entry for entry in logs if entry["event"] == "jobs.scheduler_unavailable"]
            assert len(said) == 1, logs
            assert said[0]["system"] == case.cls.name
            assert said[0]["jobs"] == 2
            assert said[0]["error"].startswith(outage.says), said[0]["error"]
            assert tracker.unavailable is not None and tracker.unavailable.startswith(outage.says)
        finally:
            await system.close()

    asyncio.run(scenario())


def test_closing_while_the_head_node_is_unreachable_tries_until_its_deadline(
    head: HeadNode, tmp_path: Path, events: list[Event]
) -> None:
    """close() with qdel unreachable: no exception, the outage said once, and it gives up at its deadline."""

    async def scenario() -> None:
        clock = ManualClock()
        case = CASES[-1]
        system = case.cls(SshRunner(head.settings().ssh_target()))
        tracker = seeded(system, case.ids, clock, events)
        await system.prepare(tracker.launcher)
        started = clock.monotonic()
        with capture_logs() as logs, Outage("nothing listening", case, head, system, tmp_path):
            await tracker.close(timeout=5.0)
        assert 5.0 <= clock.monotonic() - started < 7.0
        said = [entry for entry in logs if entry["event"] == "jobs.scheduler_unavailable"]
        assert len(said) == 1 and said[0]["error"].startswith(
            "the head node could not be reached to run qdel"
        )
        await system.close()

    asyncio.run(scenario())

"""Workers started through a real Slurm in the firewall lab, scaled with the backlog.

slurmctld and slurmd run on ``node``; ``sbatch`` runs on ``head`` over ssh, as
the lab's unprivileged user; every job runs the node launcher (its own ssh -L
hop to the head, then a worker), so workers reach the master only through
the supervised tunnel.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from wqsupervisor.batch.base import BatchOptions, JobState, SshRunner
from wqsupervisor.batch.slurm import Slurm
from wqsupervisor.clock import ManualClock
from wqsupervisor.events import Event, JobsCancelled, JobsSubmitted, JobStateChanged, JobSubmitFailed
from wqsupervisor.harness.lab import CAMPUS, NODE, Lab
from wqsupervisor.harness.labapps import CampusApp
from wqsupervisor.jobs import JobTracker
from wqsupervisor.launcher import NodeLauncher
from wqsupervisor.master import MasterStats
from wqsupervisor.policy import ScalingSettings
from wqsupervisor.protocol import SupervisorSnapshot
from wqsupervisor.status import format_text
from wqsupervisor.target import SshTarget

from support import persistent_fds, root_lab, wait_for

pytestmark = pytest.mark.lab
REMOTE_PORT = 10001


@pytest.fixture
def slurm_lab() -> Iterator[Lab]:
    """The lab with a single-node Slurm on ``node``; everything removed afterwards."""
    with root_lab() as lab:
        lab.start_slurm(cpus=4)
        yield lab


def _settings(lab: Lab, **changes: object) -> dict:
    settings = {
        "workers": "slurm",
        "min_workers": 0,
        "max_workers": 4,
        "max_per_cycle": 1,
        "scale_cooldown": 1.0,
        "max_pending": 4,
        "idle_time": 10.0,
        "node_via": "headnode",
        "batch_env": [f"SLURM_CONF={lab.slurm_conf}"],
    }
    settings.update(changes)
    return settings


def _submitted(app: CampusApp, after: float = 0.0) -> int:
    return sum(e["count"] for e in app.named("jobs.submitted", after))


def _ended(app: CampusApp) -> int:
    return len({e["job"] for e in app.named("jobs.state") if e["state"] in ("done", "cancelled")})


def test_a_backlog_brings_up_slurm_workers_that_scale_back_to_zero(slurm_lab):
    """200 tasks, 0..4 workers: 4 come up through Slurm and the tunnel, all tasks once, back to 0, none left."""
    lab = slurm_lab
    app = CampusApp(lab, REMOTE_PORT, _settings(lab))
    try:
        app.wait_event("tunnel.up", 60)
        app.submit(200, "sleep 0.5; echo out-{i}")
        app.wait_workers(2, 120)
        # Cut the tunnel while the backlog still calls for workers: no submission until it is back.
        lab.link_down()
        app.wait_event("tunnel.stalled", 30)
        cut = time.time()
        time.sleep(15)
        assert _submitted(app, after=cut + 0.5) == 0, "a job was submitted while the tunnel was down"
        lab.link_up()
        app.wait_event("tunnel.resumed", 60, after=cut)
        app.wait_workers(4, 180)
        app.wait_done(200, 300)
        assert sorted(app.results, key=int) == [str(i) for i in range(200)]
        assert all(v == [f"out-{k}"] for k, v in app.results.items())
        assert _submitted(app) <= 6, "more jobs than the backlog needed"
        # Idle workers leave after idle_time, so their jobs end: back to 0, nothing left in Slurm.
        app.wait_for(lambda: _ended(app) >= _submitted(app), 120, "every worker job to end")
        assert not lab.squeue()
    finally:
        app.close()
    assert not lab.squeue(), "the supervisor left jobs in Slurm"


WIDE = 64


def _all_running(app: CampusApp) -> SupervisorSnapshot | None:
    """The engine's snapshot once it has seen all 64 jobs running and all 64 workers (its samples lag)."""
    snap = app.snapshot()
    entry = snap.masters[0]
    running = entry.jobs is not None and entry.jobs.count("running") == WIDE
    return snap if running and entry.workers.connected == WIDE else None


@pytest.fixture
def wide_slurm_lab() -> Iterator[Lab]:
    """The lab with a Slurm whose one node takes 64 one-core worker jobs at once (CPUs overcommitted)."""
    with root_lab() as lab:
        lab.start_slurm(cpus=WIDE)
        yield lab


def test_64_slurm_workers_through_one_tunnel_run_2000_tasks_once_and_leave_nothing(wide_slurm_lab):
    """64 worker jobs, each through its node hop and the one tunnel: 2000 tasks back once, 0 jobs left, no fd leaked."""
    lab = wide_slurm_lab
    app = CampusApp(
        lab,
        REMOTE_PORT,
        _settings(lab, max_workers=WIDE, max_pending=WIDE, max_per_cycle=WIDE, idle_time=15.0),
    )
    try:
        app.wait_event("tunnel.up", 60)
        agent = int(app.ready["agent_pid"])
        fds_before = persistent_fds(agent)
        app.adapt(WIDE, WIDE)
        app.wait_workers(WIDE, 300)
        # status stays a screenful with 64 jobs: counts, not lists.
        text = format_text(
            [app.wait_for(lambda: _all_running(app), 60, "64 jobs and workers in the snapshot")]
        )
        assert "workers connected 64" in text and "running 64" in text, text
        assert len(text.splitlines()) <= 25 and max(map(len, text.splitlines())) <= 120, text
        assert max(len(e["ids"]) for e in app.named("jobs.submitted")) > 1, "jobs went one command each"
        app.submit(2000, "echo out-{i}")
        app.wait_done(2000, 600)
        assert sorted(app.results, key=int) == [str(i) for i in range(2000)]
        assert all(v == [f"out-{k}"] for k, v in app.results.items())
        # A job that ended while 64 were wanted (a worker that gave up) is replaced, nothing more.
        replaced = {
            e["job"] for e in app.named("jobs.state") if e["state"] in ("done", "failed", "cancelled")
        }
        assert _submitted(app) == WIDE + len(replaced), (
            f"{_submitted(app)} jobs for 64 workers and {len(replaced)} replacements: "
            + str(
                [e for e in app.events if e["event"].startswith("jobs.") and e["event"] != "jobs.submitted"]
            )
        )
        stats = app.wait_for(
            lambda: (s := app.latest_stats()).get("tasks_done", 0) >= 2000 and s, 30, "the master's count"
        )
        assert stats["tasks_dispatched"] == 2000, "a task was sent twice (a worker forsook it)"
        # Back to none: the idle workers leave, their jobs end, Slurm holds nothing of ours.
        app.adapt(0, 0)
        app.wait_for(lambda: _ended(app) >= WIDE, 180, "every worker job to end")
        wait_for(lambda: not lab.squeue(), 60, "Slurm's queue to empty")
        assert persistent_fds(agent) == fds_before
    finally:
        app.close()
    assert not lab.squeue(), "the supervisor left jobs in Slurm"


def test_closing_the_supervisor_cancels_every_job(slurm_lab):
    """The application quits while workers run and queue: every job is cancelled, none left."""
    lab = slurm_lab
    app = CampusApp(lab, REMOTE_PORT, _settings(lab, max_per_cycle=4, idle_time=600))
    app.wait_event("tunnel.up", 60)
    app.submit(50, "sleep 30")
    app.wait_for(lambda: len(lab.squeue()) >= 4, 120, "jobs in Slurm")
    app.close()
    assert app.named("jobs.cancelled"), "no cancellation was reported"
    deadline = time.monotonic() + 30
    while lab.squeue() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not lab.squeue(), "jobs outlived the supervisor"


def test_a_refused_submission_is_explained_and_not_repeated_in_a_storm(slurm_lab):
    """A partition that does not exist: sbatch's own error in the event, and backed-off retries."""
    lab = slurm_lab
    app = CampusApp(lab, REMOTE_PORT, _settings(lab, partition="nosuchpartition"))
    try:
        app.wait_event("tunnel.up", 60)
        app.submit(20, "echo out-{i}")
        failed = app.wait_event("jobs.submit_failed", 60)
        assert "invalid partition" in failed["error"].lower(), failed
        assert "--partition" in failed["hint"]
        time.sleep(30)
        attempts = app.named("jobs.submit_failed")
        assert 1 <= len(attempts) <= 4, f"{len(attempts)} submissions in 30 s"
        assert not app.named("jobs.submitted")
    finally:
        app.close()
    assert not lab.squeue()


def _slurm_from_campus(lab: Lab, tmp: Path, directives: tuple[str, ...]) -> Slurm:
    """Slurm driven as the supervisor drives it: the real SshRunner, ssh from campus to the head."""
    program = tmp / "ssh-from-campus"
    program.write_text(f'#!/bin/sh\nexec {shlex.join(lab.argv(CAMPUS, ["ssh"]))} "$@"\n')
    program.chmod(0o755)
    target = SshTarget("headnode", config_file=str(lab.campus_ssh_config), program=str(program))
    return Slurm(SshRunner(target, {"SLURM_CONF": lab.slurm_conf}), BatchOptions(directives=directives))


def test_a_work_directory_with_blanks_quotes_and_hash_works_with_real_sbatch(slurm_lab, tmp_path):
    """Real sbatch reads the quoted --output, and the job runs a launcher whose path has blanks, quotes and #."""
    lab = slurm_lab
    system = _slurm_from_campus(lab, tmp_path, directives=())
    home = asyncio.run(system.runner.home())
    system.workdir = f'{home}/my "odd" dir #2'
    system.launcher_path = f"{system.workdir}/launcher.sh"
    asyncio.run(system.runner.write(system.launcher_path, "#!/bin/sh\necho launcher ran\n", 0o700))
    try:
        [job] = asyncio.run(system.submit(1))
        out = f"{system.workdir}/slurm-{job}.out"
        wait_for(
            lambda: "launcher ran" in asyncio.run(system.runner.run(["cat", out])).stdout,
            60,
            "the job's output at its quoted path",
        )
    finally:
        asyncio.run(system.runner.run(["rm", "-rf", system.workdir]))


def _outage_rounds(tracker: JobTracker, clock: ManualClock, rounds: int = 3) -> None:
    for _ in range(rounds):
        clock.advance(15.0)
        asyncio.run(tracker.step())


def test_slurm_jobs_are_kept_and_not_replaced_while_slurm_cannot_be_asked(slurm_lab, tmp_path):
    """Head unreachable, then slurmctld refusing: 45 s each, the jobs stay pending and nothing is submitted."""
    lab = slurm_lab
    # Jobs that stay queued for an hour: their state can only change if the tracker invents it.
    system = _slurm_from_campus(lab, tmp_path, directives=("#SBATCH --begin=now+3600",))
    events: list[Event] = []
    clock = ManualClock()
    tracker = JobTracker(
        system=system,
        scaling=ScalingSettings(min_workers=2, max_workers=2, max_per_cycle=2, max_pending=2, cooldown=0.0),
        launcher=NodeLauncher(remote_port=REMOTE_PORT, via="headnode"),
        emit=events.append,
        stats=MasterStats,
        tunnel_up=lambda: True,
        source="slurm-test",
        clock=clock,
    )
    asyncio.run(system.prepare(tracker.launcher))
    try:
        asyncio.run(tracker.step())  # submits the two jobs the policy wants
        asyncio.run(tracker.step())  # and sees them queued
        ids = sorted(tracker.jobs)
        assert len(ids) == 2 and [e.count for e in events if isinstance(e, JobsSubmitted)] == [2]
        assert {tracker.jobs[i].state for i in ids} == {JobState.PENDING}
        assert len(lab.squeue()) == 2
        before = len(events)

        def unchanged() -> None:
            assert {tracker.jobs[i].state for i in ids} == {JobState.PENDING}
            assert not [
                e for e in events[before:] if isinstance(e, JobsSubmitted | JobSubmitFailed | JobStateChanged)
            ]
            assert sorted(line.split()[0] for line in lab.squeue()) == ids, "a job was added or lost"

        with capture_logs() as logs:
            lab.link_down()
            try:
                _outage_rounds(tracker, clock)
            finally:
                lab.link_up()
            unchanged()
            clock.advance(15.0)
            asyncio.run(tracker.step())
            unchanged()
        said = [(e["event"], e.get("error", "")) for e in logs if e["event"].startswith("jobs.scheduler")]
        assert [event for event, _ in said] == ["jobs.scheduler_unavailable", "jobs.scheduler_available"]
        assert said[0][1].startswith("the head node could not be reached to run squeue"), said

        # The head answers, slurmctld does not: squeue itself fails.
        refuse = "iptables {} INPUT -p tcp --dport 6817 -j REJECT --reject-with tcp-reset"
        with capture_logs() as logs:
            lab.sh(lab.ns[NODE], refuse.format("-I"))
            try:
                _outage_rounds(tracker, clock)
            finally:
                lab.sh(lab.ns[NODE], refuse.format("-D"))
            clock.advance(15.0)
            asyncio.run(tracker.step())
            unchanged()
        said = [(e["event"], e.get("error", "")) for e in logs if e["event"].startswith("jobs.scheduler")]
        assert [event for event, _ in said] == ["jobs.scheduler_unavailable", "jobs.scheduler_available"]
        assert said[0][1].startswith("squeue failed:") and "Unable to contact slurm controller" in said[0][1]

        # Slurm's own words for ids it does not know are answers, not failures.
        assert asyncio.run(system.states(["999999"])) == {}
        assert asyncio.run(system.states([ids[0], "999999"])) == {ids[0]: JobState.PENDING}
        asyncio.run(system.cancel(["999999"]))
    finally:
        asyncio.run(tracker.close(timeout=60))
    assert [e.ids for e in events if isinstance(e, JobsCancelled)] == [tuple(ids)]
    assert not lab.squeue(), "the tracker left jobs in Slurm"

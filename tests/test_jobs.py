"""The job tracker's reading of jobs that end: a failed submission, or a worker that ran out of work."""

from __future__ import annotations

import pytest

from wqsupervisor import JobStateChanged, JobSubmitFailed, supervise
from wqsupervisor.batch.base import JobState
from wqsupervisor.jobs import submission_failed

from support import assert_exactly_once, run_tasks, wait_for


@pytest.mark.parametrize(
    ("state", "lived", "idle_time", "failed"),
    [
        (JobState.FAILED, 1.0, 60.0, True),  # an error right away: a bad node, a missing program
        (JobState.FAILED, 19.9, 2.0, True),  # an error is an error, whatever the idle time
        (JobState.FAILED, 20.0, 60.0, False),  # it ran long enough to have done work
        (JobState.DONE, 1.0, 60.0, True),  # gone before it could have idled out
        (JobState.DONE, 1.9, 2.0, True),
        (JobState.DONE, 2.0, 2.0, False),  # lived its idle time: it may have run out of work
        (JobState.DONE, 12.0, 2.0, False),
        (JobState.DONE, 25.0, 60.0, False),
        (JobState.CANCELLED, 1.0, 60.0, False),  # we cancelled it
        (JobState.RUNNING, 1.0, 60.0, False),
    ],
)
def test_which_ends_are_failed_submissions(state, lived, idle_time, failed):
    """A failure soon after submission, or an end sooner than the idle time, is a failed submission."""
    assert submission_failed(state, lived, idle_time) is failed


def test_workers_that_run_out_of_work_leave_without_an_error(head, master, remote_port, recorder):
    """Local workers do their tasks, idle out after 2 s and leave: their jobs end as done, no submit_failed."""
    settings = head.settings(
        remote_port=remote_port,
        allow_no_password=True,
        workers="local",
        max_workers=2,
        idle_time=2.0,
        scale_cooldown=0.5,
    )
    with supervise(master, settings, on_event=recorder) as sup:
        assert sup.wait_until_up(20)
        assert_exactly_once(run_tasks(master, 6), 6)
        ended = wait_for(
            lambda: [e for e in recorder.of(JobStateChanged) if e.state == "done"] or None,
            30,
            "a worker job to end after its idle time",
        )
        assert ended
        assert not recorder.of(JobSubmitFailed), [e.error for e in recorder.of(JobSubmitFailed)]

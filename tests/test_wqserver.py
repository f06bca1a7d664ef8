"""WorkQueueServer: the Python client of Debian's work_queue_server, against real workers."""

from __future__ import annotations

import pytest

from wqsupervisor.errors import MasterError
from wqsupervisor.wqserver import Task, WorkQueueServer


def test_tasks_with_awkward_output_come_back_intact(master, workers, tmp_path):
    """Quotes, backslashes, tabs and files survive the server's JSON; tags and ids are kept."""
    out = tmp_path / "out.txt"
    workers(master.port)
    cmd = "printf '%s\\t%s\\n' \"it's\" 'a\\b'; echo done > result.txt; exit 3"
    first = master.submit(Task(cmd, tag="awkward", output_files=[(str(out), "result.txt")]))
    second = master.submit("echo plain")
    assert second == first + 1
    results = {}
    while not master.empty():
        r = master.wait(5)
        if r:
            results[r.taskid] = r
    awkward, plain = results[first], results[second]
    assert awkward.tag == "awkward" and awkward.command == cmd
    assert awkward.output == "it's\ta\\b\n" and awkward.return_status == 3 and not awkward.ok
    assert out.read_text() == "done\n"
    assert plain.output == "plain\n" and plain.ok and plain.tag is None


def test_stats_follow_the_master(master, workers):
    """stats reads the master's counters; after close it keeps the last snapshot."""
    assert master.stats.workers_connected == 0
    workers(master.port)
    master.submit("true")
    while not master.empty():
        master.wait(5)
    assert master.stats.tasks_done == 1
    master.close()
    assert master.stats.tasks_done == 1


def test_wait_with_nothing_queued_returns_none(master):
    """wait on an empty queue returns None at once, like the SWIG master."""
    assert master.empty()
    assert master.wait(1) is None


def test_a_missing_program_is_a_clear_error():
    """A master program that is not installed says what to install."""
    with pytest.raises(MasterError, match="coop-computing-tools"):
        WorkQueueServer(program="no_such_work_queue_server")

"""The worker watch as exact tables: snapshots in, events out."""

from __future__ import annotations

from wqsupervisor.events import AllWorkersLost, WorkerCountChanged, WorkersJoined, WorkersLost
from wqsupervisor.master import MasterStats
from wqsupervisor.watch import WorkerWatch


def s(connected: int, joined: int = 0, removed: int = 0) -> MasterStats:
    return MasterStats(workers_connected=connected, workers_joined=joined, workers_removed=removed)


def names(events):
    return [(type(e).__name__, getattr(e, "count", None), getattr(e, "connected", None)) for e in events]


def test_joins_and_losses_from_the_cumulative_counters():
    """A worker that came and went between two samples is still reported."""
    w = WorkerWatch(source="m")
    assert names(w.observe(s(0), 0, 100)) == []
    assert names(w.observe(s(2, joined=2), 1, 101)) == [
        ("WorkersJoined", 2, 2),
        ("WorkerCountChanged", None, 2),
    ]
    assert names(w.observe(s(2, joined=3, removed=1), 2, 102)) == [
        ("WorkersJoined", 1, 2),
        ("WorkersLost", 1, 2),
    ]
    assert names(w.observe(s(1, joined=3, removed=2), 3, 103)) == [
        ("WorkersLost", 1, 1),
        ("WorkerCountChanged", None, 1),
    ]
    assert w.peak == 2


def test_counts_alone_when_the_master_has_no_counters():
    """Masters that report only workers_connected still give join and loss events."""
    w = WorkerWatch(source="m")
    w.observe(s(1), 0, 0)
    assert names(w.observe(s(4), 1, 1)) == [("WorkersJoined", 3, 4), ("WorkerCountChanged", None, 4)]
    assert names(w.observe(s(3), 2, 2)) == [("WorkersLost", 1, 3), ("WorkerCountChanged", None, 3)]


def test_all_workers_lost_is_blamed_on_a_recent_tunnel_drop_only():
    """Losing everyone within drop_window of a tunnel drop says so; later losses do not."""
    w = WorkerWatch(source="m", drop_window=30)
    w.observe(s(3, joined=3), 0, 0)
    w.note_tunnel_down(10.0)
    lost = [e for e in w.observe(s(0, joined=3, removed=3), 12.0, 12.0) if isinstance(e, AllWorkersLost)]
    assert [(e.previous, e.after_tunnel_drop) for e in lost] == [(3, True)]
    w.observe(s(2, joined=5, removed=3), 20.0, 20.0)
    lost = [e for e in w.observe(s(0, joined=5, removed=5), 45.0, 45.0) if isinstance(e, AllWorkersLost)]
    assert [(e.previous, e.after_tunnel_drop) for e in lost] == [(2, False)]


def test_a_restarted_master_starts_the_diff_over():
    """Counters that go backwards mean a new master behind the port: no negative joins."""
    w = WorkerWatch(source="m")
    w.observe(s(5, joined=9, removed=4), 0, 0)
    events = w.observe(s(1, joined=1, removed=0), 1, 1)
    assert [type(e) for e in events] == [WorkersJoined]
    assert events[0].count == 1


def test_no_change_no_event():
    """Identical snapshots produce nothing."""
    w = WorkerWatch(source="m")
    w.observe(s(2, joined=2), 0, 0)
    assert w.observe(s(2, joined=2), 1, 1) == []
    assert not any(isinstance(e, (WorkersLost, WorkerCountChanged)) for e in w.observe(s(2, joined=2), 2, 2))


def test_a_snapshot_without_totals_is_diffed_by_the_connected_count():
    """A source without the cumulative counters (work_queue_server's status, read as the
    handle closes) is not a restarted master: no second join of workers already counted."""
    w = WorkerWatch(source="m")
    w.observe(s(2, joined=2), 0, 0)
    assert w.observe(s(2), 1, 1) == []
    assert names(w.observe(s(1), 2, 2)) == [("WorkersLost", 1, 1), ("WorkerCountChanged", None, 1)]
    # The totals carried on: the next snapshot with counters diffs against them.
    assert names(w.observe(s(2, joined=3, removed=1), 3, 3)) == [
        ("WorkersJoined", 1, 2),
        ("WorkerCountChanged", None, 2),
    ]

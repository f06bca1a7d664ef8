"""Events: typed, stable names, logged through structlog, delivered in order."""

from __future__ import annotations

import subprocess
import sys

import structlog
from structlog.testing import capture_logs

import wqsupervisor
from wqsupervisor.events import (
    AllWorkersLost,
    Event,
    EventBus,
    TunnelDown,
    TunnelUp,
    event_from_dict,
    event_types,
)

STABLE_NAMES = {
    "tunnel.starting",
    "tunnel.up",
    "tunnel.stalled",
    "tunnel.resumed",
    "tunnel.down",
    "tunnel.restarting",
    "tunnel.failed",
    "tunnel.closed",
    "tunnel.port_reclaimed",
    "workers.joined",
    "workers.lost",
    "workers.count_changed",
    "workers.all_lost",
    "workers.rejected",
    "master.unreachable",
}


def test_event_names_are_the_documented_stable_set():
    """Renaming an event breaks log searches and alerts: the set is pinned here."""
    assert set(event_types()) >= STABLE_NAMES


def test_every_event_type_is_exported():
    """Users subscribe by type, so each event class is importable from the package."""
    for cls in event_types().values():
        assert getattr(wqsupervisor, cls.__name__) is cls


def test_events_round_trip_through_json_shapes():
    """An event crossing the process boundary comes back as the same typed value."""
    up = TunnelUp(at=1.5, source="h:1", remote_port=10001, verified_by="status", took=0.31, restarts=2)
    assert event_from_dict(up.to_dict()) == up
    data = up.to_dict() | {"added_in_a_later_version": 1}
    assert event_from_dict(data) == up


def test_bus_delivers_in_order_by_type_and_survives_a_bad_listener():
    """Subscribers get matching events in order; one that raises does not stop the others."""
    bus = EventBus(log=False)
    seen: list[Event] = []
    downs: list[Event] = []
    bus.subscribe(lambda e: 1 / 0)
    bus.subscribe(seen.append)
    unsubscribe = bus.subscribe(downs.append, TunnelDown)
    events = [
        TunnelUp(at=1, source="s"),
        TunnelDown(at=2, source="s", reason="x"),
        AllWorkersLost(at=3, source="m"),
    ]
    for e in events[:2]:
        bus.emit(e)
    unsubscribe()
    bus.emit(events[2])
    assert seen == events
    assert downs == [events[1]]


def test_events_are_logged_under_their_name_with_their_fields():
    """Each emitted event is one structlog line: its stable name, its level, its fields."""
    bus = EventBus()
    with capture_logs() as logs:
        bus.emit(TunnelDown(at=2.0, source="head:10001", reason="ssh ended", exit_code=255, up_for=3.0))
    assert logs == [
        {
            "event": "tunnel.down",
            "log_level": "warning",
            "at": 2.0,
            "source": "head:10001",
            "reason": "ssh ended",
            "exit_code": 255,
            "up_for": 3.0,
        }
    ]


def test_the_library_does_not_configure_structlog():
    """Importing and using the library leaves structlog's global configuration alone."""
    structlog.reset_defaults()
    bus = EventBus()
    bus.emit(TunnelUp(at=1, source="s"))
    assert not structlog.is_configured()


def test_the_fallback_logger_follows_stderr_when_it_is_replaced():
    """The library's own logger writes to sys.stderr as it is now, even after the first stream was closed."""
    code = (
        "import io, sys\n"
        "from wqsupervisor.events import EventBus, TunnelUp\n"
        "first = io.StringIO(); real = sys.stderr; sys.stderr = first\n"
        "bus = EventBus()\n"
        "bus.emit(TunnelUp(at=1, source='before'))\n"
        "sys.stderr = real; first.close()\n"
        "bus.subscribe(lambda e: 1 / 0)\n"
        "bus.emit(TunnelUp(at=2, source='after'))\n"
        "print('survived', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "survived", done.stderr
    assert "source=after" in done.stderr and "subscriber.failed" in done.stderr, done.stderr
    assert "ZeroDivisionError" in done.stderr and "closed file" not in done.stderr, done.stderr

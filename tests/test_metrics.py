"""Prometheus export: exact series for a known snapshot, scraped over loopback from a real server."""

from __future__ import annotations

import socket
import sys
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from wqsupervisor.backends import tunnel_for
from wqsupervisor.clock import SystemClock
from wqsupervisor.config import Settings
from wqsupervisor.engine import Engine, Supervised
from wqsupervisor.errors import ConfigError
from wqsupervisor.logs import register_secret
from wqsupervisor.master import MasterInfo, MasterStats
from wqsupervisor.metrics import MetricsServer, SnapshotCollector, new_recoveries
from wqsupervisor.protocol import SupervisorSnapshot
from wqsupervisor.watch import WorkerWatch

# What JobTracker.snapshot() reports: counts by state, plus settings that are not states.
ENGINE_JOBS: dict[str, Any] = {
    "system": "slurm",
    "workdir": "/home/u/.wqs",
    "pending": 2,
    "running": 1,
    "done": 5,
    "failed": 1,
    "cancelled": 0,
    "submitted": 9,
    "min_workers": 1,
    "max_workers": 10,
    "submit_failures": 0,
}


def make_snapshot(**shape: Any) -> SupervisorSnapshot:
    """One attached master, as a handle reads it from the engine (see snapshot_json)."""
    return SupervisorSnapshot.from_dict(snapshot_json(**shape))


def snapshot_json(
    *,
    label: str = "headnode:9001",
    state: str = "up",
    recoveries: list[float] | None = None,
    jobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One attached master, as the engine sends Engine.snapshot() in JSON."""
    master: dict[str, Any] = {
        "id": "m1",
        "master": {"port": 9123, "name": "demo", "pid": 4242},
        "tunnel": {
            "label": label,
            "via": label.rsplit(":", 1)[0],
            "remote_port": 9001,
            "master_port": 9123,
            "state": state,
            "since": 1_700_000_000.0,
            "restarts": 3,
            "stalls": 2,
            "resumes": 1,
            "reclaims": 1,
            "last_error": "ssh exited with status 255",
            "rtt_ms": 12.5,
            "verified_by": "status",
            "ssh_pid": 111,
            "remote_pid": 222,
            "recoveries": [1.5, 0.25] if recoveries is None else recoveries,
            "socket": "owned",
            "rto_capped": True,
            "resume_grace": 2.0,
            "tcp": None,
        },
        "workers": {"connected": 4, "idle": 1, "busy": 3, "peak": 5},
        "tasks": {"waiting": 7, "running": 3, "on_workers": 3, "done": 12, "submitted": 22},
        "stats_age": 0.5,
    }
    if jobs is not None:
        master["jobs"] = jobs
    return {
        "version": "0.1.0",
        "pid": 4242,
        "started": 1_700_000_000.0,
        "masters": [master],
        "finished": [],
        "events": [],
    }


def scrape(server: MetricsServer) -> tuple[int, list[str]]:
    """GET /metrics over loopback; the status and the sample lines (comments dropped)."""
    with urllib.request.urlopen(server.url, timeout=10) as reply:
        body = reply.read().decode()
        return reply.status, [line for line in body.splitlines() if line and not line.startswith("#")]


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[], SupervisorSnapshot]], MetricsServer]]:
    """Start MetricsServers on 127.0.0.1 with a free port; all are stopped afterwards."""
    servers: list[MetricsServer] = []

    def start(snapshot_fn: Callable[[], SupervisorSnapshot]) -> MetricsServer:
        server = MetricsServer(snapshot_fn)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_scrape_reports_exact_series(serve):
    """A known snapshot scrapes to exactly the documented series and values."""
    server = serve(lambda: make_snapshot(jobs=ENGINE_JOBS))
    status, lines = scrape(server)
    assert status == 200
    t = 'tunnel="headnode:9001"'
    assert lines == [
        "wqsupervisor_snapshot_error 0.0",
        "wqsupervisor_masters 1.0",
        f"wqsupervisor_tunnel_up{{{t}}} 1.0",
        f'wqsupervisor_tunnel_state{{state="new",{t}}} 0.0',
        f'wqsupervisor_tunnel_state{{state="connecting",{t}}} 0.0',
        f'wqsupervisor_tunnel_state{{state="up",{t}}} 1.0',
        f'wqsupervisor_tunnel_state{{state="stalled",{t}}} 0.0',
        f'wqsupervisor_tunnel_state{{state="down",{t}}} 0.0',
        f'wqsupervisor_tunnel_state{{state="failed",{t}}} 0.0',
        f'wqsupervisor_tunnel_state{{state="closed",{t}}} 0.0',
        f"wqsupervisor_tunnel_restarts_total{{{t}}} 3.0",
        f"wqsupervisor_tunnel_stalls_total{{{t}}} 2.0",
        f"wqsupervisor_tunnel_reclaims_total{{{t}}} 1.0",
        f"wqsupervisor_tunnel_rtt_seconds{{{t}}} 0.0125",
        f"wqsupervisor_tunnel_last_recovery_seconds{{{t}}} 0.25",
        f"wqsupervisor_tunnel_recovery_seconds_count{{{t}}} 2.0",
        f"wqsupervisor_tunnel_recovery_seconds_sum{{{t}}} 1.75",
        f'wqsupervisor_workers{{state="connected",{t}}} 4.0',
        f'wqsupervisor_workers{{state="idle",{t}}} 1.0',
        f'wqsupervisor_workers{{state="busy",{t}}} 3.0',
        f'wqsupervisor_tasks{{state="waiting",{t}}} 7.0',
        f'wqsupervisor_tasks{{state="running",{t}}} 3.0',
        f'wqsupervisor_tasks{{state="done",{t}}} 12.0',
        f'wqsupervisor_tasks{{state="submitted",{t}}} 22.0',
        f'wqsupervisor_jobs{{state="pending",{t}}} 2.0',
        f'wqsupervisor_jobs{{state="running",{t}}} 1.0',
        f'wqsupervisor_jobs{{state="done",{t}}} 5.0',
        f'wqsupervisor_jobs{{state="failed",{t}}} 1.0',
        f'wqsupervisor_jobs{{state="cancelled",{t}}} 0.0',
    ]


def test_scrape_a_real_engine(serve, tmp_path):
    """A real Engine holding a real, never started, Tunnel is exported through its snapshot."""
    clock = SystemClock()
    engine = Engine(clock=clock, rundir=str(tmp_path))
    settings = Settings(via="headnode", remote_port=9001)
    master = MasterInfo(port=9123, name="demo")

    async def no_probe(_timeout: float) -> None:
        return None

    tunnel = tunnel_for(
        settings, master, emit=lambda _e: None, rundir=str(tmp_path), direct_probe=no_probe, clock=clock
    )
    tunnel.record.restarts = 2
    engine.masters["m1"] = Supervised(
        id="m1",
        master=master,
        settings=settings,
        tunnel=tunnel,
        watch=WorkerWatch(source="master:9123"),
        owner=None,
        stats=MasterStats(workers_connected=2, workers_busy=2, tasks_done=3, tasks_submitted=4),
        stats_at=clock.monotonic(),
    )
    _status, lines = scrape(serve(engine.snapshot))
    t = 'tunnel="headnode:9001"'
    for line in [
        f"wqsupervisor_tunnel_up{{{t}}} 0.0",
        f'wqsupervisor_tunnel_state{{state="new",{t}}} 1.0',
        f"wqsupervisor_tunnel_restarts_total{{{t}}} 2.0",
        f"wqsupervisor_tunnel_recovery_seconds_count{{{t}}} 0.0",
        f'wqsupervisor_workers{{state="busy",{t}}} 2.0',
        f'wqsupervisor_tasks{{state="done",{t}}} 3.0',
        f'wqsupervisor_tasks{{state="submitted",{t}}} 4.0',
    ]:
        assert line in lines
    # No RTT measured and no recovery yet: those series are absent rather than zero.
    assert not [line for line in lines if "rtt_seconds" in line or "last_recovery" in line]


def test_types_follow_prometheus_conventions(serve):
    """Counters are typed counter with _total, the recovery pair is a summary, the rest gauges."""
    server = serve(make_snapshot)
    with urllib.request.urlopen(server.url, timeout=10) as reply:
        types = [line for line in reply.read().decode().splitlines() if line.startswith("# TYPE")]
    assert "# TYPE wqsupervisor_tunnel_restarts_total counter" in types
    assert "# TYPE wqsupervisor_tunnel_recovery_seconds summary" in types
    assert "# TYPE wqsupervisor_tunnel_up gauge" in types


def test_no_jobs_key_means_no_jobs_series(serve):
    """Without a "jobs" key the jobs family is left out, not reported as zeros."""
    _status, lines = scrape(serve(make_snapshot))
    assert not [line for line in lines if line.startswith("wqsupervisor_jobs")]


def test_state_is_one_hot_and_up_follows_it(serve):
    """A stalled tunnel reports up 0 and exactly one state series at 1."""
    _status, lines = scrape(serve(lambda: make_snapshot(state="stalled")))
    assert 'wqsupervisor_tunnel_up{tunnel="headnode:9001"} 0.0' in lines
    hot = [line for line in lines if line.startswith("wqsupervisor_tunnel_state") and line.endswith(" 1.0")]
    assert hot == ['wqsupervisor_tunnel_state{state="stalled",tunnel="headnode:9001"} 1.0']


def test_failing_snapshot_still_answers_with_error_gauge(serve):
    """A snapshot_fn that raises gives a 200 scrape with the error gauge at 1, and a logged warning."""

    def broken() -> SupervisorSnapshot:
        raise RuntimeError("engine thread is gone")

    server = serve(broken)
    with capture_logs() as logs:
        status, lines = scrape(server)
    assert status == 200
    assert lines == ["wqsupervisor_snapshot_error 1.0"]
    assert [e["event"] for e in logs] == ["metrics.snapshot_failed"]
    assert "engine thread is gone" in logs[0]["error"]


def test_scrape_recovers_after_a_failing_snapshot(serve):
    """The server keeps answering: a later good snapshot is reported in full."""
    calls = iter([RuntimeError("once"), None])

    def flaky() -> SupervisorSnapshot:
        failure = next(calls, None)
        if failure is not None:
            raise failure
        return make_snapshot()

    server = serve(flaky)
    with capture_logs():
        assert scrape(server)[1] == ["wqsupervisor_snapshot_error 1.0"]
    lines = scrape(server)[1]
    assert lines[0] == "wqsupervisor_snapshot_error 0.0"
    assert 'wqsupervisor_tunnel_up{tunnel="headnode:9001"} 1.0' in lines


def test_stop_closes_the_port():
    """After stop() the port refuses connections and can be bound again."""
    server = MetricsServer(make_snapshot)
    port = server.start()
    assert port > 0
    assert scrape(server)[0] == 200
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with socket.socket() as s:
        # The scrape's connection may sit in TIME_WAIT; only a listener would block this.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    server.stop()  # a second stop is a no-op


def test_binds_loopback_by_default():
    """The default host is 127.0.0.1, and nothing is logged about exposure."""
    with capture_logs() as logs, MetricsServer(make_snapshot) as server:
        assert server.host == "127.0.0.1"
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
    assert logs == []


def test_other_address_logs_an_exposure_warning():
    """Binding a non-loopback address logs metrics.exposed at warning level."""
    with capture_logs() as logs, MetricsServer(make_snapshot, host="0.0.0.0"):
        pass
    assert [(e["event"], e["log_level"]) for e in logs] == [("metrics.exposed", "warning")]


def test_port_in_use_is_a_config_error():
    """A taken port raises ConfigError that says which address failed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            MetricsServer(make_snapshot, port=port).start()


def test_missing_prometheus_client_names_the_extra(monkeypatch):
    """Without prometheus_client the error says which extra to install."""
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigError) as info:
        MetricsServer(make_snapshot)
    assert info.value.hint == "pip install 'wqsupervisor[metrics]'"


def test_labels_are_redacted(serve):
    """A registered secret never reaches a label value."""
    register_secret("metrics-s3cret-value")
    _status, lines = scrape(serve(lambda: make_snapshot(label="metrics-s3cret-value@head:9001")))
    assert not [line for line in lines if "s3cret" in line]
    assert 'wqsupervisor_tunnel_up{tunnel="[REDACTED]@head:9001"} 1.0' in lines


def test_duplicate_tunnel_labels_are_reported_once():
    """Two masters with one label yield one series each, keeping the scrape valid."""
    raw = snapshot_json()
    raw["masters"].append(raw["masters"][0])
    snap = SupervisorSnapshot.from_dict(raw)
    families = {f.name: f for f in SnapshotCollector(lambda: snap).collect()}
    assert len(families["wqsupervisor_tunnel_up"].samples) == 1
    assert families["wqsupervisor_masters"].samples[0].value == 2


def test_recovery_count_keeps_growing_past_the_window():
    """The summary counts every recovery even when the tunnel reports only its last 20."""
    windows: list[list[float]] = [[1.0, 2.0]]
    collector = SnapshotCollector(lambda: make_snapshot(recoveries=windows[-1]))

    def count_and_sum() -> tuple[float, float]:
        family = next(f for f in collector.collect() if f.name == "wqsupervisor_tunnel_recovery_seconds")
        values = {s.name: s.value for s in family.samples}
        return values["wqsupervisor_tunnel_recovery_seconds_count"], values[
            "wqsupervisor_tunnel_recovery_seconds_sum"
        ]

    assert count_and_sum() == (2, 3.0)
    assert count_and_sum() == (2, 3.0)  # scraping again counts nothing twice
    windows.append([float(i) for i in range(1, 21)])
    assert count_and_sum() == (20, 210.0)
    windows.append([float(i) for i in range(4, 24)])  # three more, three old ones slid out
    assert count_and_sum() == (23, 210.0 + 21 + 22 + 23)


@pytest.mark.parametrize(
    ("seen", "window", "new"),
    [
        ([], [], []),
        ([], [1.0, 2.0], [1.0, 2.0]),
        ([1.0], [1.0, 2.0], [2.0]),
        ([1.0, 2.0], [1.0, 2.0], []),
        ([1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [4.0]),
        ([1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [4.0, 5.0]),
        ([1.0, 2.0], [7.0, 8.0], [7.0, 8.0]),
        ([1.0, 1.0], [1.0, 1.0, 1.0], [1.0]),
    ],
)
def test_new_recoveries_table(seen, window, new):
    """new_recoveries finds what a sliding window gained since the last scrape."""
    assert new_recoveries(seen, window) == new


def test_a_resumable_tunnel_exports_its_relay(serve):
    """A snapshot with a head relay adds its connections, buffered bytes, resumptions and last takeover time."""

    def snapshot() -> SupervisorSnapshot:
        data = snapshot_json()
        data["masters"][0]["tunnel"]["relay"] = {
            "connections": 3,
            "buffered": 4096,
            "resumptions": 2,
            "last_resumption": 1_700_000_100.0,
            "last_took": 0.75,
            "head_pid": 333,
        }
        return SupervisorSnapshot.from_dict(data)

    _status, lines = scrape(serve(snapshot))
    t = 'tunnel="headnode:9001"'
    assert [line for line in lines if line.startswith("wqsupervisor_relay")] == [
        f"wqsupervisor_relay_connections{{{t}}} 3.0",
        f"wqsupervisor_relay_buffered_bytes{{{t}}} 4096.0",
        f"wqsupervisor_relay_resumptions_total{{{t}}} 2.0",
        f"wqsupervisor_relay_last_resumption_seconds{{{t}}} 0.75",
    ]
    _status, plain = scrape(serve(make_snapshot))
    assert not [line for line in plain if line.startswith("wqsupervisor_relay")]

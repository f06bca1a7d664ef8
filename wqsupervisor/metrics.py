"""Optional Prometheus export of the engine's snapshot.

Needs the ``metrics`` extra (``pip install 'wqsupervisor[metrics]'``); the
package is imported only when a :class:`MetricsServer` is made. Every scrape
reads the snapshot afresh, so there is nothing to keep in step::

    metrics = MetricsServer(host.snapshot, port=9464)
    port = metrics.start()
    try:
        ...  # run the script
    finally:
        metrics.stop()

The server binds 127.0.0.1 unless told otherwise. It has no authentication:
any other address shows head node names, ports and counts to whoever can
reach it, and a warning is logged when such an address is used.

Series, each labelled with ``tunnel`` (the tunnel's label, ``HOST:PORT``):
``wqsupervisor_tunnel_up``, ``wqsupervisor_tunnel_state{state}`` (one-hot),
``wqsupervisor_tunnel_{restarts,stalls,reclaims}_total``,
``wqsupervisor_tunnel_rtt_seconds``, ``wqsupervisor_tunnel_last_recovery_seconds``,
``wqsupervisor_tunnel_recovery_seconds_{count,sum}``, ``wqsupervisor_workers{state}``,
``wqsupervisor_tasks{state}`` and, when the snapshot has them, ``wqsupervisor_jobs{state}``
and (resumable tunnels) ``wqsupervisor_relay_{connections,buffered_bytes,resumptions_total,
last_resumption_seconds}``.
Unlabelled: ``wqsupervisor_masters`` and ``wqsupervisor_snapshot_error`` (1 when the
snapshot could not be read, in which case nothing else is reported).
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .errors import ConfigError
from .lifecycle import TunnelState
from .logs import get_logger, redact_text
from .protocol import JOB_STATES, SupervisorSnapshot

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = ["MetricsServer", "SnapshotCollector"]

# A tunnel's snapshot holds only its most recent recoveries.
_RECOVERY_WINDOW = 20
_WORKER_STATES = ("connected", "idle", "busy")
_TASK_STATES = ("waiting", "running", "done", "submitted")


def _require_prometheus() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "Prometheus export needs the prometheus-client package",
            "pip install 'wqsupervisor[metrics]'",
        ) from exc


def new_recoveries(seen: list[float], window: list[float]) -> list[float]:
    """The entries of ``window`` not in ``seen``, the window reported at the previous scrape.

    The tunnel reports a sliding window of its last recoveries, so the new
    entries follow the longest tail of ``seen`` that ``window`` starts with.
    Equal values in a full window can hide a shift; that undercounts, never overcounts.
    """
    for start in range(len(seen) + 1):
        tail = seen[start:]
        if window[: len(tail)] == tail:
            return window[len(tail) :]
    return list(window)  # pragma: no cover - the empty tail always matches


class SnapshotCollector:
    """A prometheus_client collector that turns ``snapshot_fn()`` into series at every scrape."""

    def __init__(self, snapshot_fn: Callable[[], SupervisorSnapshot]) -> None:
        self._snapshot_fn = snapshot_fn
        # Per tunnel: the last window seen, and the running count and sum of recoveries.
        self._recoveries: dict[str, tuple[list[float], int, float]] = {}
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        """Read the snapshot and yield every metric family; never raises for a failing snapshot."""
        from prometheus_client.core import GaugeMetricFamily

        error = GaugeMetricFamily(
            "wqsupervisor_snapshot_error", "1 when this scrape could not read the engine's snapshot"
        )
        try:
            snap = self._snapshot_fn().redacted()
        except Exception as exc:
            get_logger().warning("metrics.snapshot_failed", error=redact_text(f"{type(exc).__name__}: {exc}"))
            error.add_metric([], 1)
            yield error
            return
        error.add_metric([], 0)
        yield error
        with self._lock:
            families = list(self._families(snap))
        yield from families

    def _families(self, snap: SupervisorSnapshot) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

        masters = snap.masters
        count = GaugeMetricFamily("wqsupervisor_masters", "Masters attached to the engine")
        count.add_metric([], len(masters))
        yield count

        up = GaugeMetricFamily("wqsupervisor_tunnel_up", "1 when the tunnel is up", labels=["tunnel"])
        state = GaugeMetricFamily(
            "wqsupervisor_tunnel_state", "The tunnel's state, one-hot", labels=["tunnel", "state"]
        )
        restarts = CounterMetricFamily(
            "wqsupervisor_tunnel_restarts", "Times ssh was started again for the tunnel", labels=["tunnel"]
        )
        stalls = CounterMetricFamily(
            "wqsupervisor_tunnel_stalls", "Times the tunnel's session went silent", labels=["tunnel"]
        )
        reclaims = CounterMetricFamily(
            "wqsupervisor_tunnel_reclaims", "Stale sessions ended to free the remote port", labels=["tunnel"]
        )
        rtt = GaugeMetricFamily(
            "wqsupervisor_tunnel_rtt_seconds", "Last round trip through the ssh session", labels=["tunnel"]
        )
        last_recovery = GaugeMetricFamily(
            "wqsupervisor_tunnel_last_recovery_seconds",
            "How long the last recovery took, from the drop to verified up",
            labels=["tunnel"],
        )
        recovery = SummaryMetricFamily(
            "wqsupervisor_tunnel_recovery_seconds",
            "Recoveries seen by this exporter, from the drop to verified up",
            labels=["tunnel"],
        )
        workers = GaugeMetricFamily(
            "wqsupervisor_workers", "Workers of the master, by state", labels=["tunnel", "state"]
        )
        tasks = GaugeMetricFamily(
            "wqsupervisor_tasks", "Tasks of the master, by state", labels=["tunnel", "state"]
        )
        jobs = GaugeMetricFamily(
            "wqsupervisor_jobs", "Batch jobs started for the master, by state", labels=["tunnel", "state"]
        )
        relay_conns = GaugeMetricFamily(
            "wqsupervisor_relay_connections", "Worker connections the head relay holds", labels=["tunnel"]
        )
        relay_buffered = GaugeMetricFamily(
            "wqsupervisor_relay_buffered_bytes",
            "Bytes the agent keeps for replay until the head relay acknowledges them",
            labels=["tunnel"],
        )
        relay_resumptions = CounterMetricFamily(
            "wqsupervisor_relay_resumptions",
            "Sessions that took over the head relay with its connections",
            labels=["tunnel"],
        )
        relay_took = GaugeMetricFamily(
            "wqsupervisor_relay_last_resumption_seconds",
            "From the last session's loss to the next one taking over the relay",
            labels=["tunnel"],
        )
        any_relay = False
        any_jobs = False
        seen: set[str] = set()
        for entry in masters:
            tunnel = entry.tunnel
            label = redact_text(tunnel.label or f"{tunnel.via}:{tunnel.remote_port}")
            if label in seen:  # a repeated series would make the whole scrape invalid
                continue
            seen.add(label)
            up.add_metric([label], 1 if tunnel.state is TunnelState.UP else 0)
            for each in TunnelState:
                state.add_metric([label, each.value], 1 if tunnel.state is each else 0)
            restarts.add_metric([label], tunnel.restarts)
            stalls.add_metric([label], tunnel.stalls)
            reclaims.add_metric([label], tunnel.reclaims)
            if tunnel.rtt_ms is not None:
                rtt.add_metric([label], tunnel.rtt_ms / 1000)
            window = list(tunnel.recoveries)
            if window:
                last_recovery.add_metric([label], window[-1])
            n, total = self._count_recoveries(label, window)
            recovery.add_metric([label], count_value=n, sum_value=total)
            for name in _WORKER_STATES:
                workers.add_metric([label, name], getattr(entry.workers, name))
            for name in _TASK_STATES:
                tasks.add_metric([label, name], getattr(entry.tasks, name))
            if tunnel.relay is not None:
                any_relay = True
                relay_conns.add_metric([label], tunnel.relay.connections)
                relay_buffered.add_metric([label], tunnel.relay.buffered)
                relay_resumptions.add_metric([label], tunnel.relay.resumptions)
                if tunnel.relay.last_took is not None:
                    relay_took.add_metric([label], tunnel.relay.last_took)
            if entry.jobs is not None:
                any_jobs = True
                # Only the states: the jobs snapshot also carries settings and paths.
                for name in JOB_STATES:
                    jobs.add_metric([label, name], entry.jobs.count(name))
        for gone in set(self._recoveries) - seen:
            del self._recoveries[gone]
        yield from (up, state, restarts, stalls, reclaims, rtt, last_recovery, recovery, workers, tasks)
        if any_jobs:
            yield jobs
        if any_relay:
            yield from (relay_conns, relay_buffered, relay_resumptions, relay_took)

    def _count_recoveries(self, label: str, window: list[float]) -> tuple[int, float]:
        previous, n, total = self._recoveries.get(label, ([], 0, 0.0))
        fresh = new_recoveries(previous, window)
        n, total = n + len(fresh), total + sum(fresh)
        self._recoveries[label] = (window[-_RECOVERY_WINDOW:], n, total)
        return n, total


class MetricsServer:
    """Serves ``/metrics`` for the engine's snapshot over HTTP, on 127.0.0.1 unless told otherwise.

    Any address other than loopback exposes the metrics, unauthenticated, to
    the network; :meth:`start` logs a ``metrics.exposed`` warning then.
    """

    def __init__(
        self, snapshot_fn: Callable[[], SupervisorSnapshot], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        _require_prometheus()
        from prometheus_client import CollectorRegistry

        self.host = host
        self.port = port
        self.collector = SnapshotCollector(snapshot_fn)
        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "serving" if self._server is not None else "stopped"
        return f"<MetricsServer {self.host}:{self.port} {state}>"

    @property
    def url(self) -> str:
        """Where the metrics are served."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> int:
        """Start serving in a background thread; returns the bound port."""
        if self._server is not None:
            return self.port
        from prometheus_client import start_http_server

        try:
            server, thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}",
                "choose another metrics port, or 0 for any free one",
            ) from None
        self._server, self._thread = server, thread
        self.port = int(server.server_port)
        if not _is_loopback(self.host):
            get_logger().warning(
                "metrics.exposed",
                url=self.url,
                hint="anyone who can reach this address can read the metrics; bind 127.0.0.1 instead",
            )
        return self.port

    def stop(self) -> None:
        """Stop serving and close the listening socket; returns once the port is free."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

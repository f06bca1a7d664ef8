"""The worker watch: successive stats snapshots in, worker events out.

Pure: it keeps the previous snapshot and the time of the last tunnel drop,
and turns each new snapshot into events. The cumulative ``workers_joined`` /
``workers_removed`` counters are used when the master has them, so a worker
that came and went between two samples is still seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .events import AllWorkersLost, Event, WorkerCountChanged, WorkersJoined, WorkersLost
from .master import MasterStats


@dataclass
class WorkerWatch:
    """Diffs stats snapshots of one master into worker events."""

    source: str
    drop_window: float = 30.0
    previous: MasterStats | None = None
    peak: int = 0
    tunnel_down_at: float | None = None
    history: list[tuple[float, int]] = field(default_factory=list)

    def note_tunnel_down(self, now: float) -> None:
        """Remember a tunnel drop: losing every worker soon after is blamed on it."""
        self.tunnel_down_at = now

    def observe(self, stats: MasterStats, now: float, wall: float) -> list[Event]:
        """Events for the change from the previous snapshot to ``stats``."""
        prev = self.previous
        self.previous = stats
        self.peak = max(self.peak, stats.workers_connected)
        if prev is None:
            if stats.workers_connected:
                return [
                    WorkersJoined(
                        at=wall,
                        source=self.source,
                        count=stats.workers_connected,
                        connected=stats.workers_connected,
                    )
                ]
            return []
        delta = stats.workers_connected - prev.workers_connected
        no_totals = not (stats.workers_joined or stats.workers_removed)
        if no_totals and (prev.workers_joined or prev.workers_removed):
            # No totals in this snapshot: a source that does not count workers
            # (work_queue_server's status, read by the handle as it closes), or
            # a new master that no worker has joined yet. Only the connected
            # count says anything; carry the totals on with it.
            stats = replace(
                stats,
                workers_joined=prev.workers_joined + max(delta, 0),
                workers_removed=prev.workers_removed + max(-delta, 0),
            )
            self.previous = stats
        if stats.workers_joined < prev.workers_joined or stats.workers_removed < prev.workers_removed:
            # A different master (restarted) behind the same port: start over.
            self.previous = None
            return self.observe(stats, now, wall)
        joined = stats.workers_joined - prev.workers_joined
        removed = stats.workers_removed - prev.workers_removed
        if not (joined or removed):
            joined, removed = max(delta, 0), max(-delta, 0)
        events: list[Event] = []
        if joined:
            events.append(
                WorkersJoined(at=wall, source=self.source, count=joined, connected=stats.workers_connected)
            )
        if removed:
            events.append(
                WorkersLost(at=wall, source=self.source, count=removed, connected=stats.workers_connected)
            )
        if delta:
            self.history.append((wall, stats.workers_connected))
            events.append(
                WorkerCountChanged(
                    at=wall,
                    source=self.source,
                    previous=prev.workers_connected,
                    connected=stats.workers_connected,
                )
            )
        if prev.workers_connected > 0 and stats.workers_connected == 0:
            after_drop = self.tunnel_down_at is not None and now - self.tunnel_down_at <= self.drop_window
            events.append(
                AllWorkersLost(
                    at=wall,
                    source=self.source,
                    previous=prev.workers_connected,
                    after_tunnel_drop=after_drop,
                )
            )
        return events

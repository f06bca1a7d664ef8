"""A second head node: how long the tunnel and the workers take to move when the first head's sshd stops.

In the two-head lab (``Lab(heads=2)``), a supervised master given both heads,
two node launchers knowing both, and a stream of short tasks; the first
head's sshd and its sessions are stopped. Measured from the stop: the
``tunnel.moved`` event, the tunnel verified up on the second head, and both
workers connected again (the master's own count of joins).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..common import machine, save, summary
from ..lab import HEAD2_ALIAS, Lab
from ..labapps import CampusApp, start_node_workers

REMOTE_PORT = 10001
WORKERS = 2


@contextlib.contextmanager
def two_head_run(lab: Lab, tasks: int, resume_hop: bool = False) -> Iterator[CampusApp]:
    """A master given both heads, two node launchers that know both (with ``resume_hop``, node
    relays), ``tasks`` short tasks under way."""
    app = CampusApp(lab, REMOTE_PORT, {"via": ["headnode", HEAD2_ALIAS]})
    launchers = []
    try:
        app.wait_event("tunnel.up", 60)
        launchers = start_node_workers(
            lab, REMOTE_PORT, n=WORKERS, also_via=(HEAD2_ALIAS,), resume_hop=resume_hop
        )
        app.submit(tasks, "sleep 0.2; echo out-{i}")
        app.wait_workers(WORKERS, 90)
        app.wait_done(20, 60)
        yield app
    finally:
        app.close()
        for proc in launchers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)


def stop_first_head(lab: Lab, app: CampusApp, workers_within: float = 60) -> dict[str, Any]:
    """Stop the first head's sshd and sessions; seconds from then to the tunnel's move, to its
    forward up again, and to both workers connected again (within ``workers_within``)."""
    joined = app.latest_stats()["workers_joined"]
    stopped = time.time()
    assert lab.head is not None
    lab.head.stop()
    moved = app.wait_event("tunnel.moved", 60, after=stopped)
    up = app.wait_event("tunnel.up", 60, after=stopped)

    def back() -> float | None:
        for t, s in app.stats:
            if t >= stopped and s["workers_joined"] >= joined + WORKERS and s["workers_connected"] >= WORKERS:
                return t
        return None

    workers = app.wait_for(back, workers_within, "both workers back through the second head")
    return {
        "moved": moved,
        "moved_s": moved["at"] - stopped,
        "up_s": up["at"] - stopped,
        "workers_s": workers - stopped,
    }


def _one(tasks: int = 400) -> dict[str, float]:
    with Lab(heads=2) as lab, two_head_run(lab, tasks) as app:
        timings = stop_first_head(lab, app)
        app.wait_done(tasks, 300)
        return {k: v for k, v in timings.items() if k.endswith("_s")}


def run(reps: int = 3, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """``reps`` stops of the first head, each in a fresh lab."""
    rows = []
    for r in range(reps):
        rows.append(_one())
        progress(f"failover {r + 1}/{reps}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()))
    return {
        "machine": machine(),
        "reps": reps,
        **{key: summary([row[key] for row in rows]) for key in rows[0]},
        "raw": rows,
    }


def main(argv: list[str] | None = None) -> int:
    """``benchmarks/failover.py``: the timings, on stdout and in OUT/failover.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    result = run(args.reps)
    save(result, args.out, "failover.json")
    for key, what in (
        ("moved_s", "tunnel.moved"),
        ("up_s", "tunnel verified up on the second head"),
        ("workers_s", "both workers connected again"),
    ):
        s = result[key]
        print(
            f"{what}: {s['median']:.2f} s after the stop (min {s['min']:.2f}, max {s['max']:.2f}, n={s['n']})"
        )
    return 0

"""A second head node: when the first one's sshd stops mid-run, the tunnel and the workers move to the second.

The lab with two login nodes of one cluster (``Lab(heads=2)``: ``headnode`` and
``headnode2``, each with its own sshd, links to the campus router and to the
compute node). The supervisor is given both (``via = ["headnode",
"headnode2"]``); the node launchers know both. The first head's sshd and every
session on it are stopped while tasks run.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from wqsupervisor.harness.lab import HEAD2_ALIAS, Lab
from wqsupervisor.harness.labapps import CampusApp, start_node_workers

pytestmark = pytest.mark.lab
REMOTE_PORT = 10001
TASKS = 300
WORKERS = 2


@pytest.fixture
def two_heads() -> Iterator[Lab]:
    """The lab with two head nodes; everything removed afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root; CI runs as root")
    with Lab(heads=2) as lab:
        yield lab


def test_the_first_head_stopping_moves_the_tunnel_and_the_workers_to_the_second(two_heads):
    """sshd on headnode stopped: tunnel.moved to headnode2, both workers back within 15 s, every task once."""
    lab = two_heads
    app = CampusApp(lab, REMOTE_PORT, {"via": ["headnode", HEAD2_ALIAS]})
    launchers = []
    try:
        app.wait_event("tunnel.up", 60)
        launchers = start_node_workers(lab, REMOTE_PORT, n=WORKERS, also_via=(HEAD2_ALIAS,))
        app.submit(TASKS, "sleep 0.2; echo out-{i}")
        app.wait_workers(WORKERS, 90)
        app.wait_done(20, 60)
        joined = app.latest_stats()["workers_joined"]
        stopped = time.time()
        assert lab.head is not None
        lab.head.stop()
        moved = app.wait_event("tunnel.moved", 30, after=stopped)
        assert (moved["left"], moved["to"]) == ("headnode", HEAD2_ALIAS), moved
        app.wait_event("tunnel.up", 30, after=stopped)
        # Both workers came back, through headnode2, within 15 s of the stop.
        app.wait_for(
            lambda: any(
                t >= stopped and s["workers_joined"] >= joined + WORKERS and s["workers_connected"] >= WORKERS
                for t, s in app.stats
            ),
            15,
            "both workers back through the second head",
        )
        assert app.snapshot().masters[0].tunnel.via == HEAD2_ALIAS
        app.wait_done(TASKS, 300)
        assert sorted(app.results, key=int) == [str(i) for i in range(TASKS)]
        for tag, outputs in app.results.items():
            assert outputs == [f"out-{tag}"], (tag, outputs)
    finally:
        app.close()
        for proc in launchers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)

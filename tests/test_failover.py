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
from pathlib import Path

import pytest

from wqsupervisor.harness.bench.failover import REMOTE_PORT, WORKERS, stop_first_head, two_head_run
from wqsupervisor.harness.lab import HEAD, HEAD2_ALIAS, HEAD_CAMPUS_IP, NODE, ROUTER, Lab
from wqsupervisor.harness.labapps import CampusApp, node_logs, start_node_workers

from support import lab_relays, root_lab

pytestmark = pytest.mark.lab
TASKS = 300


@pytest.fixture
def two_heads() -> Iterator[Lab]:
    """The lab with two head nodes; everything removed afterwards."""
    with root_lab(heads=2) as lab:
        yield lab


@pytest.mark.parametrize("resume_hop", [False, True], ids=["plain-hops", "node-relays"])
def test_the_first_head_stopping_moves_the_tunnel_and_the_workers_to_the_second(two_heads, resume_hop):
    """sshd on headnode stopped: tunnel.moved to headnode2, both workers back within 15 s, every task once
    (the node relays of resumable hops move as the plain hops do)."""
    lab = two_heads
    with two_head_run(lab, TASKS, resume_hop=resume_hop) as app:
        if resume_hop:
            assert not lab.node_hops() and len(lab.node_relay_hops()) == WORKERS
        seen = stop_first_head(lab, app, workers_within=15)
        assert (seen["moved"]["left"], seen["moved"]["to"]) == ("headnode", HEAD2_ALIAS), seen
        assert app.snapshot().masters[0].tunnel.via == HEAD2_ALIAS
        # The connections the first head's relay had kept open to the master are let go once the
        # tunnel is up on the second: the master counts only the two live workers (it would keep
        # the others, and their tasks, until its own keepalive gave up on them).
        app.wait_for(
            lambda: app.latest_stats()["workers_connected"] == WORKERS, 20, "only the live workers connected"
        )
        app.wait_done(TASKS, 300)
        assert sorted(app.results, key=int) == [str(i) for i in range(TASKS)]
        for tag, outputs in app.results.items():
            assert outputs == [f"out-{tag}"], (tag, outputs)


def test_with_the_campus_side_cut_off_the_tunnel_comes_back_on_the_head_its_workers_use(two_heads):
    """Campus link down and the tunnel's ssh killed: both heads out of reach; after the heal the tunnel is
    up on headnode again, where the node hops still are, and every task comes back once."""
    lab = two_heads
    with two_head_run(lab, TASKS) as app:
        pid = app.snapshot().masters[0].tunnel.ssh_pid
        assert pid is not None
        cut = time.time()
        lab.link_down()
        try:
            os.kill(pid, signal.SIGKILL)
            # The other head is tried at once, then it goes back to the head it was up on...
            app.wait_for(lambda: len(app.named("tunnel.moved", cut)) >= 2, 60, "two moves")
            time.sleep(10)  # ...and waits there, however long the cut lasts
        finally:
            lab.link_up()
        moves = app.named("tunnel.moved", cut)
        assert [m["to"] for m in moves] == [HEAD2_ALIAS, "headnode"], moves
        assert "every head is out of reach" in moves[1]["why"], moves
        app.wait_event("tunnel.up", 60, after=cut)
        assert app.snapshot().masters[0].tunnel.via == "headnode"
        app.wait_done(TASKS, 300)
        assert sorted(app.results, key=int) == [str(i) for i in range(TASKS)]
        for tag, outputs in app.results.items():
            assert outputs == [f"out-{tag}"], (tag, outputs)


@pytest.mark.parametrize("resume_hop", [False, True], ids=["plain-hops", "node-relays"])
def test_a_hop_to_a_head_without_the_tunnel_moves_to_the_head_with_it(two_heads, resume_hop):
    """The tunnel is on headnode only; a launcher that tries headnode2 first gets a hop there (its sshd
    answers) but the master's port behind it refuses the worker: the hop moves on, every task done."""
    lab = two_heads
    app = CampusApp(lab, REMOTE_PORT, {"via": "headnode"})
    launchers = []
    try:
        app.wait_event("tunnel.up", 60)
        launchers = start_node_workers(
            lab, REMOTE_PORT, via=HEAD2_ALIAS, also_via=("headnode",), resume_hop=resume_hop
        )
        app.submit(20, "echo out-{i}")
        app.wait_done(20, 120)
        assert sorted(app.results, key=int) == [str(i) for i in range(20)]
        log = node_logs(lab, chars=100_000)
        if resume_hop:
            assert (
                "resumable" in log and f"the tunnel's port on {HEAD2_ALIAS} refused the worker for 10s" in log
            ), log
        else:
            assert f"-> {HEAD2_ALIAS}:127.0.0.1:{REMOTE_PORT}" in log, log
            assert f"hop to {HEAD2_ALIAS}: the master's port there refused the worker" in log, log
    finally:
        app.close()
        for proc in launchers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    deadline = time.monotonic() + 10
    while lab.pids(NODE) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = lab.pids(NODE)
    assert not left, (
        f"something outlived the node launcher: {[Path(f'/proc/{p}/cmdline').read_bytes() for p in left]}"
    )


def test_the_relay_left_on_a_head_cut_off_from_campus_is_ended_when_it_answers_again(two_heads):
    """Campus loses headnode alone (its compute node still reaches it) and the tunnel's ssh dies: the tunnel
    moves to headnode2, while headnode's relay holds the workers for a supervisor that went elsewhere. Once
    headnode answers again the supervisor ends that relay (tunnel.relay_released): the workers come over
    to headnode2 and every task comes back once."""
    lab = two_heads
    cut = [
        ["FORWARD", "-d", HEAD_CAMPUS_IP, "-j", "DROP"],
        ["FORWARD", "-s", HEAD_CAMPUS_IP, "-j", "DROP"],
    ]
    with two_head_run(lab, TASKS) as app:
        assert app.snapshot().masters[0].tunnel.resume_off is None, "resumption is on with several heads"
        held = lab_relays(lab, HEAD)
        assert len(held) == 1, "the relay on headnode holds the node workers' connections"
        pid = app.snapshot().masters[0].tunnel.ssh_pid
        assert pid is not None
        started = time.time()
        for rule in cut:
            lab.sh(lab.ns[ROUTER], "iptables -I " + " ".join(rule))
        try:
            os.kill(pid, signal.SIGKILL)
            moved = app.wait_event("tunnel.moved", 60, after=started)
            assert moved["to"] == HEAD2_ALIAS, moved
            app.wait_event("tunnel.up", 60, after=moved["at"])
            time.sleep(3)
            assert lab_relays(lab, HEAD) == held, "headnode's relay waits while campus cannot reach it"
            assert not app.named("tunnel.relay_released", started)
        finally:
            for rule in cut:
                lab.sh(lab.ns[ROUTER], "iptables -D " + " ".join(rule))
        healed = time.time()
        released = app.wait_event("tunnel.relay_released", 60, after=healed)
        assert released["head"] == "headnode", released
        deadline = time.monotonic() + 10
        while lab_relays(lab, HEAD) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not lab_relays(lab, HEAD), "the relay left on headnode was not ended"
        app.wait_done(TASKS, 300)
        assert app.snapshot().masters[0].tunnel.via == HEAD2_ALIAS
        assert sorted(app.results, key=int) == [str(i) for i in range(TASKS)]
        for tag, outputs in app.results.items():
            assert outputs == [f"out-{tag}"], (tag, outputs)

"""The firewall lab: every way a tunnel dies, with real namespaces, sshd, masters and workers.

Each fault runs while tasks flow from a master on ``campus`` to workers on
``node`` that reach it only through their own ``ssh -L`` hop to ``head`` and
the head's ``-R`` port. Whatever the fault, every task must come back exactly
once with its output, no process may be left behind, and the supervisor's
agent must not leak file descriptors. Timings are measured by
``benchmarks/faults.py``, not asserted here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from wqsupervisor.harness.lab import CAMPUS, CAMPUS_IP, HEAD, NODE, ROUTER, Lab, remove_remains
from wqsupervisor.harness.labapps import CampusApp, node_logs, start_node_workers
from wqsupervisor.protocol import TunnelSnapshot
from wqsupervisor.relay.headmain import HOP_PROCESS_NAME

from support import lab_relays, persistent_fds, root_lab

pytestmark = pytest.mark.lab
REMOTE_PORT = 10001
TASKS = 160
WORKERS = 2
HOP_NAME = HOP_PROCESS_NAME.decode()


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh campus/head/node lab, removed afterwards whatever happens."""
    with root_lab() as built:
        yield built


class Run:
    """A campus app with workers on node and a stream of tasks, checked at the end.

    Plain forwarding unless ``settings`` say otherwise: these tests are of the ssh session and its
    port (who holds it, its reclaim, its resumption); the relay has its own (``RESUMABLE_FAULTS``).
    """

    def __init__(self, lab: Lab, settings: dict | None = None, resume_hop: bool = False) -> None:
        self.lab = lab
        self.app = CampusApp(lab, REMOTE_PORT, {"resume": False, **(settings or {})})
        self.app.wait_event("tunnel.up", 60)
        self.launchers = start_node_workers(lab, REMOTE_PORT, n=WORKERS, resume_hop=resume_hop)
        # The master takes workers in only from inside wait(), which it calls while it has tasks.
        self.app.submit(TASKS, "sleep 0.2; echo out-{i}")
        self.app.wait_workers(WORKERS, 90)
        self.agent = int(self.app.ready["agent_pid"])
        self.fds_before = persistent_fds(self.agent)
        self.app.wait_done(10, 60)
        self.started = time.time()
        self.removed_before = self.app.latest_stats().get("workers_removed", 0)

    def tunnel(self) -> TunnelSnapshot:
        return self.app.snapshot().masters[0].tunnel

    def finish(self, timeout: float = 300) -> None:
        """All tasks back exactly once with their output; nothing leaked, nothing left."""
        self.app.wait_done(TASKS, timeout)
        time.sleep(1.0)
        assert sorted(self.app.results, key=int) == [str(i) for i in range(TASKS)]
        for tag, outputs in self.app.results.items():
            assert outputs == [f"out-{tag}"], (tag, outputs)
        self.app.wait_for(lambda: self.tunnel().state.value == "up", 60, "the tunnel to be up")
        after = persistent_fds(self.agent)
        assert len(after) == len(self.fds_before), (
            f"the agent leaked file descriptors: now {sorted(after - self.fds_before)}, "
            f"before {sorted(self.fds_before - after)}\n" + self.lab.sh(self.lab.ns[CAMPUS], "ss -tanpo")
        )
        self.app.close()
        for proc in self.launchers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        deadline = time.monotonic() + 10
        while (self.lab.pids(CAMPUS) or self.lab.pids(NODE)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.lab.pids(CAMPUS), "something outlived the campus application"
        assert not self.lab.pids(NODE), "something outlived the node launchers"

    def events(self, name: str) -> list[dict]:
        return self.app.named(name, after=self.started)

    def workers_removed(self) -> int:
        return self.app.latest_stats().get("workers_removed", 0) - self.removed_before


def test_lab_hosts_are_isolated(lab):
    """node cannot reach campus, head cannot connect into campus, and no host routes anywhere else."""
    for host in (CAMPUS, ROUTER, HEAD, NODE):
        routes = lab.sh(lab.ns[host], "ip route")
        assert "default" not in routes, (host, routes)
    assert lab.sh(lab.ns[HEAD], "cat /proc/sys/net/ipv4/ip_forward").strip() == "0"
    listener = lab.popen(
        CAMPUS,
        [
            "python3",
            "-c",
            f"import socket,time;s=socket.socket();s.bind(('{CAMPUS_IP}',7777));s.listen();time.sleep(60)",
        ],
    )
    try:
        time.sleep(0.5)
        probe = f"import socket;socket.create_connection(('{CAMPUS_IP}',7777),2)"
        from_node = subprocess.run(lab.argv(NODE, ["python3", "-c", probe]), capture_output=True, text=True)
        assert from_node.returncode != 0 and "unreachable" in from_node.stderr
        from_head = subprocess.run(lab.argv(HEAD, ["python3", "-c", probe]), capture_output=True, text=True)
        assert from_head.returncode != 0 and "timed out" in from_head.stderr
    finally:
        listener.kill()
        listener.wait()


def test_lab_removes_everything_even_when_the_test_fails():
    """Namespaces, links, the lab user and files are gone after the block, also on an exception."""
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root")
    with pytest.raises(RuntimeError), Lab() as lab:
        names, user, root = list(lab.ns.values()), lab.user, lab.root
        raise RuntimeError("a failing test")
    existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in existing for name in names)
    assert subprocess.run(["id", user], capture_output=True).returncode != 0
    assert not root.exists()


def test_lab_removes_everything_when_its_process_is_terminated(tmp_path):
    """A benchmark or test killed with SIGTERM mid-run still takes its lab down."""
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root")
    script = (
        "import time\nfrom wqsupervisor.harness.lab import Lab\n"
        "with Lab() as lab:\n    print(lab.tag, lab.root, flush=True)\n    time.sleep(300)\n"
    )
    tag, root, code = "", "", None
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as proc:
        try:
            tag, root = proc.stdout.readline().split()
            proc.terminate()
            code = proc.wait(60)
        finally:
            proc.kill()
            proc.wait()
            left = _remove_lab_remains(tag, root) if tag else {}
    assert code == 128 + signal.SIGTERM, f"the lab's process ended with {code}, not by unwinding"
    assert not left, f"the lab left these behind: {left}"


def _remove_lab_remains(tag: str, root: str) -> dict[str, object]:
    """Whatever a lab with this tag left behind, removed (so a failure does not leak into the next test)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    namespaces = [n for n in listed if n.startswith(f"wqs-{tag}-")]
    left: dict[str, object] = {
        "namespaces": namespaces,
        "user": subprocess.run(["id", f"wqs{tag}"], capture_output=True).returncode == 0,
        "directory": os.path.exists(root),
    }
    remove_remains(namespaces, [f"wqs{tag}", f"wqo{tag}"], root)
    return {k: v for k, v in left.items() if v}


def test_workers_reach_the_master_only_through_their_hop(lab):
    """Tasks run on node workers; node has no way to the master other than its hop to the head."""
    run = Run(lab)
    port = run.app.ready["master_port"]
    probe = f"import socket;socket.create_connection(('{CAMPUS_IP}',{port}),2)"
    direct = subprocess.run(lab.argv(NODE, ["python3", "-c", probe]), capture_output=True, text=True)
    assert direct.returncode != 0
    assert lab.node_hops(), "the workers use an ssh -L hop"
    run.finish()
    assert not run.events("tunnel.down")


def _kill_ssh(run: Run) -> None:
    os.kill(run.tunnel().ssh_pid, signal.SIGKILL)


def _kill_session(run: Run) -> None:
    pid = run.lab.port_holder(REMOTE_PORT)
    assert pid is not None and pid == run.tunnel().remote_pid
    run.lab.kill_session(pid)


def _restart_sshd(run: Run) -> None:
    run.lab.restart_sshd(down_for=2.0)


@pytest.mark.parametrize(
    "cut", [_kill_ssh, _kill_session, _restart_sshd], ids=["ssh-killed", "session-killed", "sshd-restarted"]
)
def test_a_dead_tunnel_is_restarted(lab, cut: Callable[[Run], None]):
    """The ssh client, the head's session, or the head's sshd dies: a new tunnel, nothing lost."""
    run = Run(lab)
    cut(run)
    run.app.wait_event("tunnel.down", 10, after=run.started)
    run.app.wait_event("tunnel.up", 60, after=run.started)
    run.finish()


def test_a_hung_peer_is_detected_and_replaced(lab):
    """The head's session is SIGSTOPped: the session stalls, is replaced, and its port reclaimed."""
    run = Run(lab)
    hung = run.tunnel().remote_pid
    lab.stop_session(hung)
    try:
        run.app.wait_event("tunnel.stalled", 20, after=run.started)
        reclaimed = run.app.wait_event("tunnel.port_reclaimed", 60, after=run.started)
        assert reclaimed["pid"] == hung
        run.app.wait_event("tunnel.up", 60, after=run.started)
    finally:
        lab.resume_session(hung)
    run.finish()


@pytest.mark.parametrize("seconds", [5, 90])
def test_link_down_keeps_the_session(lab, seconds):
    """The campus-head link goes down: the session is kept, stalls, and resumes when it returns."""
    run = Run(lab)
    with lab.fault(lab.link_down, lab.link_up):
        run.app.wait_event("tunnel.stalled", 20, after=run.started)
        time.sleep(seconds - 3)
    run.app.wait_event("tunnel.resumed", 60, after=run.started)
    assert not run.events("tunnel.down"), "a session that could resume was restarted"
    run.finish()


# The forward is back this soon after a heal that forgot the old connections (the target is 5 s).
FORGOTTEN_BACK_WITHIN = 15.0


@pytest.mark.parametrize("seconds", [5, 20, 90])
@pytest.mark.parametrize("forget", [False, True], ids=["kept", "forgotten"])
def test_blackhole(lab, seconds, forget):
    """The router drops everything, then heals: kept connections resume untouched; forgotten ones are replaced."""
    run = Run(lab)
    with lab.fault(lab.blackhole, lambda: lab.heal(forget=forget)):
        if seconds >= 5:
            run.app.wait_event("tunnel.stalled", 20, after=run.started)
        time.sleep(max(0.0, seconds - (time.time() - run.started)))
    healed = time.time()
    if forget:
        run.app.wait_event("tunnel.port_reclaimed", 60, after=healed)
        up = run.app.wait_event("tunnel.up", 60, after=healed)
        assert up["at"] - healed < FORGOTTEN_BACK_WITHIN, (
            f"the forward came back {up['at'] - healed:.1f} s after the heal"
        )
    else:
        run.app.wait_event("tunnel.resumed", 60, after=healed)
        assert not run.events("tunnel.down"), "a session that could resume was restarted"
        assert not run.events("tunnel.starting")
    run.finish()
    if not forget:
        assert run.workers_removed() == 0, "a worker lost its connection"


def test_blackhole_in_the_heads_own_chains_is_still_available(lab):
    """The first model (drops in the head's INPUT and OUTPUT) stays available by name: kept, nothing lost."""
    run = Run(lab)
    with lab.fault(lambda: lab.blackhole(model="host-output"), lab.heal):
        run.app.wait_event("tunnel.stalled", 20, after=run.started)
        time.sleep(max(0.0, 20 - (time.time() - run.started)))
    run.app.wait_event("tunnel.resumed", 60, after=time.time())
    assert not run.events("tunnel.down"), "a session that could resume was restarted"
    run.finish()
    assert run.workers_removed() == 0, "a worker lost its connection"


def test_flapping_link_is_rate_limited(lab):
    """Down/up every 2 s for 30 s: the tunnel survives it without a restart storm."""
    run = Run(lab)
    lab.flap(period=2.0, duration=30.0)
    starts = run.events("tunnel.starting")
    assert len(starts) <= 5, f"{len(starts)} restarts in 30 s of flapping"
    run.finish()


def test_node_hop_killed_is_restored(lab):
    """The node's ssh -L hop is killed: the launcher restarts it and the workers reconnect."""
    run = Run(lab)
    before = lab.node_hops()
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    run.app.wait_for(lambda: set(lab.node_hops()) - set(before), 60, "new hops")
    run.app.wait_workers(WORKERS, 90, after=time.time())
    run.finish()
    assert not run.events("tunnel.down"), "the campus tunnel was not involved"


@pytest.mark.parametrize("resume", [False, True], ids=["plain", "resumable"])
def test_a_busy_application_is_not_a_fault(lab, resume):
    """The application stays out of wait() for 60 s: no stall, no restart, nothing lost."""
    run = Run(lab, {"resume": resume})
    run.app.send("busy 60")
    run.app.wait_for(
        lambda: run.app._replies and run.app._replies[-1].get("kind") == "idle",
        90,
        "the application to come back",
    )
    assert not run.events("tunnel.down")
    assert not run.events("tunnel.stalled")
    run.finish()


def test_the_supervisor_socket_options(lab):
    """The tunnel's TCP connection is ours: retransmission backoff capped where the kernel allows."""
    run = Run(lab)
    tunnel = run.tunnel()
    assert tunnel.socket == "owned"
    with socket.socket() as s:
        try:
            s.setsockopt(socket.IPPROTO_TCP, 44, 1000)
            capped = True
        except OSError:
            capped = False
    assert tunnel.rto_capped is capped
    assert tunnel.tcp is not None and tunnel.tcp.rtt_ms >= 0
    run.finish()


# -- resumable forwarding: the same faults cost no worker and no task ------------------------------


def _hang_session(run: Run) -> None:
    hung = run.tunnel().remote_pid
    run.lab.stop_session(hung)
    run.app.wait_event("tunnel.stalled", 20, after=run.started)
    run.app.wait_event("tunnel.up", 60, after=run.started)
    run.lab.resume_session(hung)


def _forgotten_blackhole(run: Run) -> None:
    with run.lab.fault(run.lab.blackhole, lambda: run.lab.heal(forget=True)):
        time.sleep(20)


def _link_down(run: Run) -> None:
    with run.lab.fault(run.lab.link_down, run.lab.link_up):
        time.sleep(90)


# A head sshd restarted with its sessions (as the lab's restart does) also ends the node
# launchers' plain -L hops: test_resumable_hops_keep_their_workers_through_a_head_sshd_restart
# restarts it under node relays, tests/test_resumable.py under workers on the head's port.
RESUMABLE_FAULTS: dict[str, Callable[[Run], None]] = {
    "ssh-killed": _kill_ssh,
    "session-killed": lambda run: run.lab.kill_session(run.tunnel().remote_pid),
    "peer-hung": _hang_session,
    "blackhole-20s-forgotten": _forgotten_blackhole,
    "link-down-90s": _link_down,
}


@pytest.mark.parametrize("fault", list(RESUMABLE_FAULTS))
def test_resumable_tunnel_faults_cost_no_worker_and_no_task(lab, fault):
    """Each fault under a resumable tunnel: no worker removed, no task sent twice, the relay gone after close."""
    run = Run(lab, {"backend": "resumable"})
    assert run.tunnel().resume_off is None, run.tunnel().resume_off
    relays = lab_relays(lab, HEAD)
    assert len(relays) == 1, "one head relay holds the workers' connections"
    RESUMABLE_FAULTS[fault](run)
    run.app.wait_for(lambda: run.tunnel().state.value == "up", 90, "the tunnel to be up again")
    if fault != "link-down-90s":
        run.app.wait_event("tunnel.relay_reattached", 60, after=run.started)
        assert run.tunnel().relay.resumptions >= 1
    assert lab_relays(lab, HEAD) == relays, "the same head relay carried the tunnel through the fault"
    run.finish()
    stats = run.app.latest_stats()
    assert run.workers_removed() == 0, "a worker lost its connection"
    assert stats["tasks_dispatched"] == stats["tasks_submitted"] == TASKS, "a task was sent twice"
    deadline = time.monotonic() + 10
    while lab_relays(lab, HEAD) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not lab_relays(lab, HEAD), "the head relay outlived close()"


def test_resumable_hops_keep_their_workers_through_a_head_sshd_restart(lab):
    """Node relays: their ssh killed, then the head's sshd restarted with every session; no worker lost.

    The sshd restart ends the tunnel's session and every hop's: the head relay and the hop daemons
    hold both sides of the workers' connections, the tunnel and the node relays start new sessions
    and reattach, and every task comes back once with no worker removed.
    """
    run = Run(lab, {"backend": "resumable"}, resume_hop=True)
    assert not lab.node_hops(), "the node relays run the hops, not ssh -L"
    hops = lab_relays(lab, HEAD, HOP_NAME)
    assert len(hops) == WORKERS, f"one hop daemon per node relay on the head: {hops}"
    relays = lab_relays(lab, HEAD)
    first = lab.node_relay_hops()
    assert len(first) == WORKERS, first
    for pid in first:
        os.kill(pid, signal.SIGKILL)

    def resumed(times: int) -> bool:
        return node_logs(lab, chars=1_000_000).count("hop resumed") >= times * WORKERS

    # Each node relay's backoff starts at 1 s: both resumed before the next fault.
    run.app.wait_for(lambda: resumed(1), 30, "every hop resumed after its ssh was killed")
    done = run.app.latest_stats().get("tasks_done", 0)
    run.app.wait_done(done + 5, 60)
    lab.restart_sshd(down_for=2.0)
    run.app.wait_event("tunnel.relay_reattached", 60, after=run.started)
    run.app.wait_for(lambda: resumed(2), 60, "every hop resumed after the sshd restart")
    done = run.app.latest_stats().get("tasks_done", 0)
    run.app.wait_done(min(TASKS, done + 5), 60)
    assert lab_relays(lab, HEAD, HOP_NAME) == hops, "the same hop daemons carried the hops through"
    assert lab_relays(lab, HEAD) == relays, "the same head relay carried the tunnel through"
    run.finish()
    stats = run.app.latest_stats()
    assert run.workers_removed() == 0, "a worker lost its connection:\n" + node_logs(lab)
    assert stats["tasks_dispatched"] == stats["tasks_submitted"] == TASKS, "a task was sent twice"
    deadline = time.monotonic() + 10
    while (lab_relays(lab, HEAD, HOP_NAME) or lab_relays(lab, HEAD)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not lab_relays(lab, HEAD, HOP_NAME), "a hop daemon outlived its node relay"
    assert not lab_relays(lab, HEAD), "the head relay outlived close()"

"""The supervised tunnel end to end: real sshd on loopback, real master, real workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from wqsupervisor import (
    AllWorkersLost,
    TunnelDown,
    TunnelFailed,
    TunnelStarting,
    TunnelState,
    TunnelUp,
    WorkersJoined,
    supervise,
)
from wqsupervisor.harness.sandbox import HeadNode
from wqsupervisor.process import pid_alive
from wqsupervisor.wqserver import Task, WorkQueueServer

from support import assert_exactly_once, listening, processes_matching, python_env, run_tasks, wait_for


def test_tasks_run_on_workers_that_only_know_the_remote_port(head, master, remote_port, workers, recorder):
    """Workers given only the head node's forwarded port run every task, once, correctly."""
    assert remote_port != master.port
    with supervise(master, head.settings(remote_port=remote_port), on_event=recorder) as sup:
        assert sup.wait_until_up(20)
        assert sup.state is TunnelState.UP
        workers(remote_port, n=2)
        assert_exactly_once(run_tasks(master, 30), 30)
        # The engine counts workers through the master's status port, which
        # answers only inside wait(); 30 echo tasks can finish between two
        # samples, so keep the master waiting on a slower task until it has looked.
        master.submit(Task("sleep 3; echo warm", tag="warm-up"))
        outputs = []
        deadline = time.monotonic() + 30
        while not (outputs and recorder.of(WorkersJoined)) and time.monotonic() < deadline:
            if (done := master.wait(0.5)) is not None:
                outputs.append(done.output.strip())
        assert outputs == ["warm"]
        recorder.wait(WorkersJoined, 1)
        snap = sup.snapshot().masters[0]
        assert snap.tunnel.state.value == "up"
        assert snap.tunnel.verified_by in ("status", "connect")
        assert snap.workers.peak >= 1
    assert not listening(remote_port), "the remote port outlived close()"


def test_closing_the_tunnel_cuts_the_workers_off(head, master, remote_port, workers, recorder):
    """The workers really go through the tunnel: without it they lose the master."""
    sup = supervise(master, head.settings(remote_port=remote_port), on_event=recorder)
    try:
        assert sup.wait_until_up(20)
        workers(remote_port)
        assert_exactly_once(run_tasks(master, 5), 5)
        wait_for(lambda: master.stats.workers_connected == 1, 10, "the worker to be connected")
    finally:
        sup.close()
    master.wait(1)
    wait_for(
        lambda: master.wait(1) is None and master.stats.workers_connected == 0,
        20,
        "the worker to lose the master",
    )


def _ssh_pid(sup) -> int:
    return sup.snapshot().masters[0].tunnel.ssh_pid


def test_ssh_client_sigkilled_mid_run(head, master, remote_port, workers, recorder):
    """The ssh client is SIGKILLed mid-run: the tunnel comes back and every task returns exactly once."""
    with supervise(
        master, head.settings(remote_port=remote_port, stable_after=1.0), on_event=recorder
    ) as sup:
        assert sup.wait_until_up(20)
        workers(remote_port, n=2)
        killed = []

        def cut(done: int) -> None:
            if done == 20 and not killed:
                pid = _ssh_pid(sup)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        results = run_tasks(master, 80, cut)
        assert killed
        assert_exactly_once(results, 80)
        down = recorder.wait(TunnelDown, 5)[0]
        assert "SIGKILL" in down.reason
        ups = recorder.wait(TunnelUp, 20, count=2)
        assert ups[1].restarts == 1
        assert _ssh_pid(sup) != killed[0]


def test_head_sshd_restarted_mid_run(head, master, remote_port, workers, recorder):
    """The head node's sshd is restarted (all sessions die): the tunnel comes back, nothing is lost."""
    with supervise(master, head.settings(remote_port=remote_port), on_event=recorder) as sup:
        assert sup.wait_until_up(20)
        workers(remote_port, n=2)
        restarted = []

        def cut(done: int) -> None:
            if done == 20 and not restarted:
                head.restart(down_for=1.0)
                restarted.append(True)

        results = run_tasks(master, 80, cut)
        assert restarted
        assert_exactly_once(results, 80)
        recorder.wait(TunnelDown, 5)
        recorder.wait(TunnelUp, 30, count=2)
        assert sup.state is TunnelState.UP
        lost = recorder.of(AllWorkersLost)
        assert all(e.after_tunnel_drop for e in lost)


def direct_settings(head: HeadNode, remote_port: int):
    """Settings that name the head node by address and key, without its ssh_config alias."""
    return head.settings(remote_port=remote_port).replace(
        ssh_config=None,
        via=f"{head.user}@127.0.0.1",
        ssh_port=head.port,
        identity=str(head.identity),
        ssh_options=(("UserKnownHostsFile", str(head.known_hosts)), ("IdentitiesOnly", "yes")),
    )


def _assert_fails(head_settings, recorder, timeout=30) -> TunnelFailed:
    with WorkQueueServer() as q:
        sup = supervise(q, head_settings, on_event=recorder)
        try:
            with pytest.raises(Exception) as info:
                sup.wait_until_up(timeout)
            assert sup.state is TunnelState.FAILED, info.value
            failed = recorder.wait(TunnelFailed, 5)[0]
            assert failed.hint, "a failure must say what to do"
            assert not processes_matching(f":{head_settings.remote_port}:localhost:"), "ssh left running"
            return failed
        finally:
            sup.close()


def test_wrong_key_fails_clearly_without_retrying_forever(head, remote_port, recorder, tmp_path):
    """A key the head node does not accept: a clear error, no endless retries, no ssh left."""
    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    settings = direct_settings(head, remote_port).replace(identity=str(key))
    failed = _assert_fails(settings, recorder)
    assert "Permission denied" in failed.error
    assert "identity" in failed.hint.lower()
    assert len(recorder.of(TunnelStarting)) == 1, "authentication failures are not retried"


def test_unknown_host_key_fails_clearly(head, remote_port, recorder, tmp_path):
    """A head node whose host key is not in known_hosts: refused, with what to do."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    failed = _assert_fails(
        head.settings(remote_port=remote_port, ssh_options=(("UserKnownHostsFile", str(empty)),)), recorder
    )
    assert "known_hosts" in failed.error
    assert "by hand" in failed.hint


def test_changed_host_key_fails_clearly(head, remote_port, recorder, tmp_path):
    """A host key that changed is never accepted and never retried."""
    other = HeadNode(str(tmp_path / "other"), port=head.port)
    failed = _assert_fails(
        head.settings(remote_port=remote_port, ssh_options=(("UserKnownHostsFile", str(other.known_hosts)),)),
        recorder,
    )
    assert "does not match" in failed.error
    assert len(recorder.of(TunnelStarting)) == 1


def test_nothing_listening_gives_up_after_bounded_retries(head, remote_port, recorder):
    """Nothing accepts ssh on the port: a few spaced retries, then a clear failure."""
    dead_port = remote_port  # free: nothing listens there
    settings = direct_settings(head, dead_port).replace(
        ssh_port=dead_port, start_attempts=3, backoff_initial=0.1
    )
    failed = _assert_fails(settings, recorder)
    assert "nothing accepts ssh connections" in failed.error
    assert "ssh-port" in failed.hint
    assert len(recorder.of(TunnelStarting)) == 3


def test_remote_port_taken_by_another_program(head, remote_port, recorder):
    """A remote port already bound on the head node by something else: the error names the port."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", remote_port))
        squatter.listen()
        failed = _assert_fails(head.settings(remote_port=remote_port), recorder)
    assert f"remote port {remote_port}" in failed.error
    assert "python" in failed.error, "the error says who holds the port"
    assert "--remote-port" in failed.hint


_APP = textwrap.dedent(
    """
    import sys, time
    from wqsupervisor import Settings, WorkQueueServer, supervise
    cfg, port = sys.argv[1], int(sys.argv[2])
    q = WorkQueueServer()
    sup = supervise(q, Settings(via="headnode", ssh_config=cfg, remote_port=port, allow_no_password=True),
                    log_events=False)
    assert sup.wait_until_up(20)
    snap = sup.snapshot().masters[0].tunnel
    print(sup._agent.pid, snap.ssh_pid, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("victim", ["application", "agent"])
def test_supervisor_sigkilled_leaves_no_ssh_here_or_on_the_head(head, remote_port, victim):
    """SIGKILL of the application or of the agent: no ssh survives, here or on the head node."""
    with subprocess.Popen(
        [sys.executable, "-c", _APP, str(head.ssh_config), str(remote_port)],
        stdout=subprocess.PIPE,
        text=True,
        env=python_env(),
    ) as app:
        try:
            agent_pid, ssh_pid = map(int, app.stdout.readline().split())
            wait_for(lambda: listening(remote_port), 10, "the remote port")
            sessions = head.sessions()
            assert sessions, "the tunnel has a session on the head node"
            os.kill(app.pid if victim == "application" else agent_pid, signal.SIGKILL)
            wait_for(lambda: not pid_alive(ssh_pid), 10, "ssh to exit")
            assert not processes_matching(f"{remote_port}:localhost:")
            wait_for(lambda: not any(p in head.sessions() for p in sessions), 10, "the head's session to end")
            wait_for(lambda: not listening(remote_port), 10, "the remote port to close")
            if victim == "application":
                wait_for(lambda: not pid_alive(agent_pid), 10, "the agent to exit")
        finally:
            app.kill()
            app.wait()

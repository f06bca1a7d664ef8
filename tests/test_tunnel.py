"""The supervised tunnel end to end, for every transport: real sshd on loopback, real master, real workers.

Each test runs once per session implementation (the ``backend`` fixture); a
new transport is one more name in :data:`wqsupervisor.backends.BACKENDS`.
Tests that only make sense for one transport live in ``test_openssh.py`` or
``test_paramiko_backend.py``, or are marked below.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import Any

import pytest

from wqsupervisor import (
    AllWorkersLost,
    TunnelDown,
    TunnelFailed,
    TunnelRestarting,
    TunnelStarting,
    TunnelState,
    TunnelUp,
    WorkersJoined,
    WQSupervisorError,
    supervise,
)
from wqsupervisor.backends import BACKENDS, sessions_for
from wqsupervisor.config import Settings
from wqsupervisor.harness.sandbox import HeadNode
from wqsupervisor.process import pid_alive
from wqsupervisor.session import Session, SessionEnded
from wqsupervisor.wqserver import Task, WorkQueueServer

from support import (
    assert_exactly_once,
    drive,
    free_port,
    listening,
    processes_matching,
    python_env,
    run_tasks,
    wait_for,
)

# Transports that run their session inside the agent process, without an ssh client.
IN_PROCESS = {"paramiko"}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    """Each session implementation in turn."""
    return str(request.param)


def settings_for(head: HeadNode, backend: str, remote_port: int, **options: Any) -> Settings:
    """The sandbox head node's settings with ``backend`` (a resumable one's head relay lingers 5 s, not 15 min)."""
    options.setdefault("relay_linger", 5.0)
    if backend == "openssh":
        options.setdefault("resume", False)  # the plain OpenSSH session; "resumable" is the relay
    return head.settings(remote_port=remote_port, backend=backend, **options)


def test_tasks_run_on_workers_that_only_know_the_remote_port(
    head, master, remote_port, workers, recorder, backend
):
    """Workers given only the head node's forwarded port run every task, once, correctly."""
    assert remote_port != master.port
    with supervise(master, settings_for(head, backend, remote_port), on_event=recorder) as sup:
        assert sup.wait_until_up(20)
        assert sup.state is TunnelState.UP
        snap = sup.snapshot().masters[0].tunnel
        assert snap.remote_pid in head.sessions(), "the session's sshd on the head is known"
        if backend in IN_PROCESS:
            assert snap.ssh_pid is None, "no ssh process: the session lives in the agent"
            assert not processes_matching(f"{remote_port}:localhost:{master.port}"), (
                "an ssh client was started"
            )
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
        wait_for(
            lambda: sup.snapshot().masters[0].tunnel.rtt_ms is not None,
            10,
            "a ping through the session",
        )
    assert not listening(remote_port), "the remote port outlived close()"
    wait_for(lambda: not head.sessions(), 10, "the head's sshd session to end")


def test_closing_the_tunnel_cuts_the_workers_off(head, master, remote_port, workers, recorder, backend):
    """The workers really go through the tunnel: without it they lose the master."""
    sup = supervise(master, settings_for(head, backend, remote_port), on_event=recorder)
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
    """(OpenSSH) The ssh client is SIGKILLed mid-run: the tunnel comes back and every task returns exactly once."""
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


def test_head_sessions_killed_mid_run(head, master, remote_port, workers, recorder, backend):
    """The head's sshd sessions are SIGKILLed mid-run: the tunnel comes back, every task returns exactly once."""
    settings = settings_for(head, backend, remote_port, stable_after=1.0)
    with supervise(master, settings, on_event=recorder) as sup:
        assert sup.wait_until_up(20)
        workers(remote_port, n=2)
        killed: list[int] = []

        def cut(done: int) -> None:
            if done == 20 and not killed:
                killed.extend(head.kill_sessions())

        results = run_tasks(master, 80, cut)
        assert killed
        assert_exactly_once(results, 80)
        down = recorder.wait(TunnelDown, 5)[0]
        if backend == "paramiko":
            assert "closed by remote host" in down.reason, down.reason
        else:
            # ssh words the head's end of the connection by what it was doing then:
            # reading, writing, or reading after the kernel's reset (unread data).
            assert re.search(r"closed by remote host|Broken pipe|Connection reset", down.reason), down.reason
            assert down.exit_code == 255
        ups = recorder.wait(TunnelUp, 20, count=2)
        assert ups[1].restarts == 1
        assert sup.state is TunnelState.UP
        assert not set(killed) & set(head.sessions())


def test_head_sshd_restarted_mid_run(head, master, remote_port, workers, recorder, backend):
    """The head node's sshd is restarted (all sessions die): the tunnel comes back, nothing is lost."""
    with supervise(master, settings_for(head, backend, remote_port), on_event=recorder) as sup:
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


def direct_settings(head: HeadNode, remote_port: int, backend: str = "openssh") -> Settings:
    """Settings that name the head node by address and key, without its ssh_config alias."""
    return settings_for(head, backend, remote_port).replace(
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


def test_wrong_key_fails_clearly_without_retrying_forever(head, remote_port, recorder, tmp_path, backend):
    """A key the head node does not accept: a clear error, no endless retries, no ssh left."""
    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    settings = direct_settings(head, remote_port, backend).replace(identity=str(key))
    failed = _assert_fails(settings, recorder)
    assert "Permission denied" in failed.error
    assert "Permission denied (publickey)" in failed.error
    assert "identity" in failed.hint.lower()
    assert len(recorder.of(TunnelStarting)) == 1, "authentication failures are not retried"


def test_unknown_host_key_fails_clearly(head, remote_port, recorder, tmp_path, backend):
    """A head node whose host key is in no known_hosts file: refused, never added, with what to do."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    failed = _assert_fails(
        settings_for(head, backend, remote_port, ssh_options=(("UserKnownHostsFile", str(empty)),)), recorder
    )
    assert "known_hosts" in failed.error
    assert "not in known_hosts" in failed.error
    assert "by hand" in failed.hint
    assert empty.read_text() == "", "the key was added to known_hosts"


def test_changed_host_key_fails_clearly(head, remote_port, recorder, tmp_path, backend):
    """A host key that changed is never accepted and never retried."""
    other = HeadNode(str(tmp_path / "other"), port=head.port)
    failed = _assert_fails(
        settings_for(
            head, backend, remote_port, ssh_options=(("UserKnownHostsFile", str(other.known_hosts)),)
        ),
        recorder,
    )
    assert "does not match" in failed.error
    assert len(recorder.of(TunnelStarting)) == 1


def test_nothing_listening_gives_up_after_bounded_retries(head, remote_port, recorder, backend):
    """Nothing accepts ssh on the port: a few spaced retries, then a clear failure."""
    dead_port = remote_port  # free: nothing listens there
    settings = direct_settings(head, dead_port, backend).replace(
        ssh_port=dead_port, start_attempts=3, backoff_initial=0.1
    )
    failed = _assert_fails(settings, recorder)
    assert "nothing accepts ssh connections" in failed.error
    assert "ssh-port" in failed.hint
    assert len(recorder.of(TunnelStarting)) == 3


def test_remote_port_taken_by_another_program(head, remote_port, recorder, backend):
    """A remote port already bound on the head node by something else: the error names the port."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", remote_port))
        squatter.listen()
        failed = _assert_fails(settings_for(head, backend, remote_port), recorder)
    assert f"remote port {remote_port}" in failed.error
    assert f"(pid {os.getpid()}," in failed.error, "the error says who holds the port"
    assert "--remote-port" in failed.hint


_APP = textwrap.dedent(
    """
    import sys, time
    from wqsupervisor import Settings, WorkQueueServer, supervise
    cfg, port, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    q = WorkQueueServer()
    # relay_linger: the resumable backend's head relay outlives a SIGKILLed agent for that long only.
    sup = supervise(q, Settings(via="headnode", ssh_config=cfg, remote_port=port, backend=backend,
                                allow_no_password=True, relay_linger=3.0),
                    log_events=False)
    assert sup.wait_until_up(20)
    snap = sup.snapshot().masters[0].tunnel
    print(sup._agent.pid, snap.ssh_pid or 0, sup._rundir, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("victim", ["application", "agent"])
def test_supervisor_sigkilled_leaves_no_ssh_here_or_on_the_head(head, remote_port, victim, backend):
    """SIGKILL of the application or of the agent: no ssh survives, here or on the head node."""
    with subprocess.Popen(
        [sys.executable, "-c", _APP, str(head.ssh_config), str(remote_port), backend],
        stdout=subprocess.PIPE,
        text=True,
        env=python_env(),
    ) as app:
        try:
            agent, ssh, rundir = app.stdout.readline().split()
            agent_pid, ssh_pid = int(agent), int(ssh)
            assert (ssh_pid == 0) is (backend in IN_PROCESS)
            wait_for(lambda: listening(remote_port), 10, "the remote port")
            sessions = head.sessions()
            assert sessions, "the tunnel has a session on the head node"
            os.kill(app.pid if victim == "application" else agent_pid, signal.SIGKILL)
            if ssh_pid:
                wait_for(lambda: not pid_alive(ssh_pid), 10, "ssh to exit")
            assert not processes_matching(f"{remote_port}:localhost:")
            wait_for(lambda: not any(p in head.sessions() for p in sessions), 10, "the head's session to end")
            wait_for(lambda: not listening(remote_port), 10, "the remote port to close")
            wait_for(lambda: not pid_alive(agent_pid), 10, "the agent to exit")
            # The survivor removes it: the agent when its application died, the application when the agent did.
            wait_for(lambda: not os.path.exists(rundir), 10, "the agent's run directory to go")
        finally:
            app.kill()
            app.wait()


def test_the_handle_reports_its_agents_death_at_once_and_reaps_it(head, master, remote_port, recorder):
    """SIGKILL of the agent: the handle says FAILED with why (state, event, failure) and leaves no zombie."""
    # Plain forwarding: a relay outlives a killed agent by design (its linger), its port with it.
    settings = head.settings(remote_port=remote_port, allow_no_password=True, resume=False)
    with supervise(master, settings, on_event=recorder) as sup:
        assert sup.wait_until_up(20)
        agent = sup._agent
        os.kill(agent.pid, signal.SIGKILL)
        failed = recorder.wait(TunnelFailed, 5)[0]
        assert "agent" in failed.error and "SIGKILL" in failed.error, failed.error
        assert failed.hint
        assert sup.state is TunnelState.FAILED
        assert sup.failure is not None and "SIGKILL" in sup.failure
        assert agent.returncode == -signal.SIGKILL, "the agent was reaped, not left a zombie"
        assert not os.path.exists(sup._rundir), "the agent's run directory outlived it"
        with pytest.raises(WQSupervisorError, match="agent"):
            sup.wait_until_up(1)
        wait_for(lambda: not listening(remote_port), 10, "the remote port to close")


# -- a session driven directly, through the session interface ----------------------------------


async def start_session(settings: Settings, master_port: int | None, rundir: str) -> Session:
    """A session of ``settings.backend`` started directly (no tunnel), as the tunnel starts one."""
    sessions = sessions_for(settings)
    await sessions.prepare(rundir, "direct")
    assert settings.remote_port is not None
    return await sessions.start(master_port=master_port, remote_port=settings.remote_port, probes="probe")


def _in_wait(q: WorkQueueServer, seconds: float) -> asyncio.Future[Any]:
    """Keep the master in wait() (where it answers status requests) for a while."""
    q.submit(Task("sleep 1000"))  # no worker: wait() sits out its timeout
    return asyncio.ensure_future(asyncio.to_thread(q.wait, seconds))


async def _status(port: int, timeout: float = 5.0) -> Any:
    """queue_status on the head's 127.0.0.1:port, as a worker on the head node would ask."""
    import json

    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(b"queue_status\n")
        return json.loads(await asyncio.wait_for(reader.read(), timeout))[0]
    finally:
        writer.close()
        await writer.wait_closed()


def test_direct_session_forwards_pings_probes_and_leaves_nothing(head, master, remote_port, backend):
    """A session driven directly forwards, probes and pings, and close() leaves no thread, socket or sshd."""
    from wqsupervisor.wqproto import request_status

    async def body() -> None:
        with tempfile.TemporaryDirectory() as rundir:
            session = await start_session(settings_for(head, backend, remote_port), master.port, rundir)
            try:
                await asyncio.wait_for(session.established(), 10)
                assert session.running
                assert (session.pid is None) is (backend in IN_PROCESS)
                assert session.remote_pid in head.sessions()
                assert session.sock is not None
                assert session.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                rtts = [await asyncio.wait_for(session.ping(), 5) for _ in range(5)]
                assert all(0 < r < 1 for r in rtts)
                waiting = _in_wait(master, 4)
                await asyncio.sleep(0.2)
                through_probe = await request_status(session.open_probe, timeout=3)
                assert through_probe is not None and through_probe[0]["port"] == master.port
                many = await asyncio.gather(*(_status(remote_port) for _ in range(8)))
                assert {entry["port"] for entry in many} == {master.port}
                await waiting
                if backend in IN_PROCESS:
                    assert any(t.name.startswith("wqs-paramiko") for t in threading.enumerate())
            finally:
                code = await session.close()
            # A resumable session asks its head relay to end, and ssh ends with it (0); the others are stopped.
            assert code == 0 if backend == "resumable" else code is not None and code != 0, code
            assert not session.running
            assert not [t for t in threading.enumerate() if t.name.startswith("wqs-paramiko")]

    drive(body)
    wait_for(lambda: not listening(remote_port), 5, "the head to release the remote port")
    wait_for(lambda: not head.sessions(), 10, "the head's sshd session to end")


def test_session_ends_with_a_nonzero_code_when_the_head_kills_it(head, master, remote_port, backend):
    """Killing the head's sshd session ends exited() with 255 and a transient network failure."""

    async def body() -> None:
        with tempfile.TemporaryDirectory() as rundir:
            session = await start_session(settings_for(head, backend, remote_port), master.port, rundir)
            try:
                await asyncio.wait_for(session.established(), 10)
                head.kill_sessions()
                code = await asyncio.wait_for(session.exited(), 10)
                assert code == 255
                failure = session.failure().once_up()
                assert failure.kind == "network" and not failure.permanent, failure
                assert "closed by remote host" in failure.message, failure
                with pytest.raises(SessionEnded):
                    await session.ping()
            finally:
                await session.close()

    drive(body)


@pytest.mark.parametrize("kind", ["openssh", "paramiko"])
def test_a_port_taken_after_the_tunnel_was_up_is_retried_and_comes_back(
    head, master, remote_port, recorder, kind
):
    """Our session dies, another program binds the port for a while: the tunnel says who, retries, and is back."""
    settings = settings_for(head, kind, remote_port, backoff_initial=0.2, backoff_cap=1.0)
    with supervise(master, settings, on_event=recorder) as sup:
        assert sup.wait_until_up(20)
        squatter = socket.socket()
        try:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            deadline = time.monotonic() + 20
            while True:  # the restart races us for the port: kill its session until we have it
                assert time.monotonic() < deadline, "could not take the port from the tunnel"
                head.kill_sessions()
                try:
                    squatter.bind(("127.0.0.1", remote_port))
                    break
                except OSError:
                    time.sleep(0.01)
            squatter.listen()
            taken = wait_for(
                lambda: [e for e in recorder.of(TunnelRestarting) if f"(pid {os.getpid()}," in e.why],
                30,
                "a restart that names the port's holder",
            )
            assert f"remote port {remote_port}" in taken[0].why
            assert sup.failure is None and sup.state is not TunnelState.FAILED
        finally:
            squatter.close()
        wait_for(lambda: sup.state is TunnelState.UP, 30, "the tunnel back once the port is free")
        assert not recorder.of(TunnelFailed)
    assert not listening(remote_port)


def test_the_summary_says_failed_for_a_tunnel_that_failed_and_was_then_closed():
    """close() ends a failed tunnel, but the run's last line still gives the failure, not 'closed'."""
    from wqsupervisor.protocol import MasterSnapshot, SupervisorSnapshot, TunnelSnapshot
    from wqsupervisor.protocol.snapshot import MasterSummary
    from wqsupervisor.runapp import summary_line

    tunnel = TunnelSnapshot(
        via="headnode", remote_port=9123, state=TunnelState.CLOSED, failed="permission denied (publickey)"
    )
    snap = SupervisorSnapshot(
        finished=(MasterSnapshot(id="m1", master=MasterSummary(port=9123), tunnel=tunnel),)
    )
    line = summary_line("app.py", 0, 3.0, snap)
    assert "tunnel headnode:9123 failed, 0 restart(s)" in line
    assert "error: permission denied (publickey)" in line


@pytest.mark.parametrize("kind", ["openssh", "paramiko"])
def test_a_revoked_host_key_is_refused_even_when_also_known(head, remote_port, recorder, tmp_path, kind):
    """known_hosts lists the head's key and marks it @revoked: both backends refuse it, as ssh does, for good."""
    known = head.known_hosts.read_text().strip()
    hosts, key = known.split(" ", 1)
    revoked = tmp_path / "known_hosts"
    revoked.write_text(f"{known}\n@revoked {hosts} {key}\n")
    settings = settings_for(head, kind, remote_port).replace(
        ssh_options=(("UserKnownHostsFile", str(revoked)),), start_attempts=2
    )
    failed = _assert_fails(settings, recorder)
    assert "marked @revoked in known_hosts" in failed.error, failed.error
    assert len(recorder.of(TunnelStarting)) == 1, "a revoked key is final, not retried"


def test_with_every_head_out_of_reach_the_moves_are_paced_and_the_tunnel_gives_up(
    head, remote_port, recorder
):
    """Two heads, nothing accepts ssh on either: one move at once, then a restart delay before every move."""
    dead_port = remote_port  # free: nothing listens there
    settings = direct_settings(head, dead_port).replace(
        via=f"{head.user}@127.0.0.1",
        also_via=(f"{head.user}@127.0.0.2",),
        remote_port=free_port(),
        ssh_port=dead_port,
        start_attempts=4,
        backoff_initial=0.1,
    )
    failed = _assert_fails(settings, recorder)
    assert "nothing accepts ssh connections" in failed.error
    names = [
        e.name for e in recorder.events if e.name in ("tunnel.starting", "tunnel.moved", "tunnel.restarting")
    ]
    assert names == [
        "tunnel.starting",
        "tunnel.moved",  # to the second head at once
        "tunnel.starting",
        "tunnel.moved",  # back to the first: every head was tried, so this one waits its turn
        "tunnel.restarting",
        "tunnel.starting",
        "tunnel.moved",
        "tunnel.restarting",
        "tunnel.starting",
        "tunnel.moved",
        "tunnel.restarting",
        "tunnel.starting",
    ], names

"""The paramiko backend end to end: real sshd on loopback, real master, real workers, no ssh process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from wqsupervisor import TunnelDown, TunnelFailed, TunnelStarting, TunnelState, TunnelUp, openssh, supervise
from wqsupervisor.config import Settings
from wqsupervisor.harness.sandbox import HeadNode
from wqsupervisor.paramiko_backend import ParamikoSession, host_key_name, known_host_keys
from wqsupervisor.process import pid_alive
from wqsupervisor.wqserver import Task, WorkQueueServer

from support import assert_exactly_once, listening, processes_matching, python_env, run_tasks, wait_for


def paramiko_settings(head: HeadNode, remote_port: int, **options: Any) -> Settings:
    """The sandbox head node's settings with the paramiko backend."""
    return head.settings(remote_port=remote_port, backend="paramiko", **options)


def _assert_fails(settings: Settings, recorder, timeout: float = 30) -> TunnelFailed:
    with WorkQueueServer() as q:
        sup = supervise(q, settings, on_event=recorder)
        try:
            with pytest.raises(Exception) as info:
                sup.wait_until_up(timeout)
            assert sup.state is TunnelState.FAILED, info.value
            failed = recorder.wait(TunnelFailed, 5)[0]
            assert failed.hint, "a failure must say what to do"
            assert not processes_matching(f":{settings.remote_port}:localhost:"), "an ssh was started"
            return failed
        finally:
            sup.close()


# -- through the supervisor (the agent process runs the backend) ----------------------------


def test_tasks_run_on_workers_that_only_know_the_remote_port(head, master, remote_port, workers, recorder):
    """With backend='paramiko', workers given only the head's forwarded port run every task once."""
    with supervise(master, paramiko_settings(head, remote_port), on_event=recorder) as sup:
        assert sup.wait_until_up(20)
        snap = sup.snapshot().masters[0].tunnel
        assert snap.ssh_pid is None, "no ssh process: the session lives in the agent"
        assert snap.remote_pid in head.sessions(), "the session's sshd on the head is known"
        assert not processes_matching(f"{remote_port}:localhost:{master.port}"), "an ssh client was started"
        workers(remote_port, n=2)
        assert_exactly_once(run_tasks(master, 30), 30)
        wait_for(
            lambda: sup.snapshot().masters[0].tunnel.rtt_ms is not None,
            10,
            "a ping through the session",
        )
    assert not listening(remote_port), "the remote port outlived close()"
    wait_for(lambda: not head.sessions(), 10, "the head's sshd session to end")


def test_head_sessions_killed_mid_run(head, master, remote_port, workers, recorder):
    """The head's sshd sessions are SIGKILLed mid-run: the tunnel comes back, every task returns exactly once."""
    settings = paramiko_settings(head, remote_port, stable_after=1.0)
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
        assert "closed by remote host" in down.reason, down.reason
        ups = recorder.wait(TunnelUp, 20, count=2)
        assert ups[1].restarts == 1
        assert sup.state is TunnelState.UP
        assert not set(killed) & set(head.sessions())


def test_wrong_key_fails_clearly_without_retrying_forever(head, remote_port, recorder, tmp_path):
    """A key the head node does not accept: 'Permission denied (publickey)', one attempt, no retries."""
    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    settings = paramiko_settings(head, remote_port).replace(
        ssh_config=None,
        via=f"{head.user}@127.0.0.1",
        ssh_port=head.port,
        identity=str(key),
        ssh_options=(("UserKnownHostsFile", str(head.known_hosts)), ("IdentitiesOnly", "yes")),
    )
    failed = _assert_fails(settings, recorder)
    assert "Permission denied (publickey)" in failed.error
    assert "identity" in failed.hint.lower()
    assert len(recorder.of(TunnelStarting)) == 1, "authentication failures are not retried"


def test_unknown_host_key_fails_clearly(head, remote_port, recorder, tmp_path):
    """A head node whose host key is in no known_hosts file: refused, never added, with what to do."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    failed = _assert_fails(
        paramiko_settings(head, remote_port, ssh_options=(("UserKnownHostsFile", str(empty)),)), recorder
    )
    assert "not in known_hosts" in failed.error
    assert "by hand" in failed.hint
    assert empty.read_text() == "", "the key was added to known_hosts"


def test_changed_host_key_fails_clearly(head, remote_port, recorder, tmp_path):
    """A host key that differs from the known one is never accepted and never retried."""
    other = HeadNode(str(tmp_path / "other"), port=head.port)
    failed = _assert_fails(
        paramiko_settings(head, remote_port, ssh_options=(("UserKnownHostsFile", str(other.known_hosts)),)),
        recorder,
    )
    assert "does not match" in failed.error
    assert len(recorder.of(TunnelStarting)) == 1


def test_remote_port_taken_by_another_program(head, remote_port, recorder):
    """A remote port already bound on the head node: the refusal is classified and names the port."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", remote_port))
        squatter.listen()
        failed = _assert_fails(paramiko_settings(head, remote_port), recorder)
    assert f"remote port {remote_port}" in failed.error
    assert "python" in failed.error, "the error says who holds the port"
    assert "--remote-port" in failed.hint


_APP = textwrap.dedent(
    """
    import sys, time
    from wqsupervisor import Settings, WorkQueueServer, supervise
    cfg, port = sys.argv[1], int(sys.argv[2])
    q = WorkQueueServer()
    sup = supervise(q, Settings(via="headnode", ssh_config=cfg, remote_port=port, backend="paramiko",
                                allow_no_password=True),
                    log_events=False)
    assert sup.wait_until_up(20)
    print(sup._agent.pid, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("victim", ["application", "agent"])
def test_supervisor_sigkilled_leaves_no_session_on_the_head(head, remote_port, victim):
    """SIGKILL of the application or of the agent: the head's sshd session ends and the remote port closes."""
    with subprocess.Popen(
        [sys.executable, "-c", _APP, str(head.ssh_config), str(remote_port)],
        stdout=subprocess.PIPE,
        text=True,
        env=python_env(),
    ) as app:
        try:
            agent_pid = int(app.stdout.readline())
            wait_for(lambda: listening(remote_port), 10, "the remote port")
            sessions = head.sessions()
            assert sessions, "the tunnel has a session on the head node"
            os.kill(app.pid if victim == "application" else agent_pid, signal.SIGKILL)
            wait_for(lambda: not any(p in head.sessions() for p in sessions), 10, "the head's session to end")
            wait_for(lambda: not listening(remote_port), 10, "the remote port to close")
            wait_for(lambda: not pid_alive(agent_pid), 10, "the agent to exit")
        finally:
            app.kill()
            app.wait()


# -- the session driven directly, in this process -----------------------------------------------


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def drive(body: Callable[[], Awaitable[None]]) -> None:
    """Run ``body`` in a fresh event loop and check that it leaves no thread and no descriptor behind."""
    threads = {t.ident for t in threading.enumerate()}
    fds = _fds()
    asyncio.run(body())
    left = [t.name for t in threading.enumerate() if t.ident not in threads]
    assert not left, f"threads left: {left}"
    assert _fds() <= fds, f"descriptors left: {sorted(_fds() - fds)}"


async def _session(settings: Settings, master_port: int | None) -> ParamikoSession:
    config = await openssh.read_config(settings)
    assert settings.remote_port is not None
    return await ParamikoSession.start(
        settings, config, master_port=master_port, remote_port=settings.remote_port
    )


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


def _in_wait(q: WorkQueueServer, seconds: float) -> asyncio.Future[Any]:
    """Keep the master in wait() (where it answers status requests) for a while."""
    q.submit(Task("sleep 1000"))  # no worker: wait() sits out its timeout
    return asyncio.ensure_future(asyncio.to_thread(q.wait, seconds))


def test_direct_session_forwards_pings_probes_and_leaves_nothing(head, master, remote_port):
    """A session driven directly forwards, probes and pings, and close() leaves no thread, socket or sshd."""
    from wqsupervisor.wqproto import request_status

    async def body() -> None:
        session = await _session(paramiko_settings(head, remote_port), master.port)
        try:
            await asyncio.wait_for(session.established(), 10)
            assert session.pid is None and session.running
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
            assert any(t.name.startswith("wqs-paramiko") for t in threading.enumerate())
        finally:
            code = await session.close()
        assert code is not None and code != 0
        assert not session.running
        assert not [t for t in threading.enumerate() if t.name.startswith("wqs-paramiko")]

    drive(body)
    wait_for(lambda: not listening(remote_port), 5, "the head to release the remote port")
    wait_for(lambda: not head.sessions(), 10, "the head's sshd session to end")


def test_session_ends_with_a_nonzero_code_when_the_head_kills_it(head, master, remote_port):
    """Killing the head's sshd session ends exited() with 255 and words that say the connection closed."""

    settings = paramiko_settings(head, remote_port)

    async def body() -> None:
        session = await _session(settings, master.port)
        try:
            await asyncio.wait_for(session.established(), 10)
            head.kill_sessions()
            code = await asyncio.wait_for(session.exited(), 10)
            assert code == 255
            failure = openssh.SshFailure.from_output(session.stderr, code, settings, ever_up=True)
            assert failure.kind == "network" and not failure.permanent, failure
            with pytest.raises(openssh.SessionEnded):
                await session.ping()
        finally:
            await session.close()

    drive(body)


def test_allocated_port_and_refused_probe(head, master):
    """remote_port=0: the head picks a port and stderr says which, as ssh's does; a probe to nothing is refused."""

    async def body() -> None:
        session = await _session(paramiko_settings(head, 0), master.port)
        try:
            await asyncio.wait_for(session.established(), 10)
            port = openssh.allocated_port(session.stderr)
            assert port and port == session.remote_port
            assert listening(port)
        finally:
            await session.close()
        wait_for(lambda: not listening(port), 5, "the head to release the allocated port")
        # A probes-only session (as the tunnel opens to see who holds a port): nothing listens there now.
        probes = await _session(paramiko_settings(head, port), None)
        try:
            await asyncio.wait_for(probes.established(), 10)
            assert not listening(port), "a probes-only session binds nothing"
            with pytest.raises(ConnectionRefusedError):
                await probes.open_probe()
        finally:
            await probes.close()

    drive(body)


def test_failed_start_and_close_while_connecting_leave_nothing(head, remote_port, tmp_path):
    """A refused host key and a close() in the middle of connecting both end cleanly, with ssh's words."""

    async def body() -> None:
        empty = tmp_path / "known_hosts"
        empty.write_text("")
        settings = paramiko_settings(head, remote_port, ssh_options=(("UserKnownHostsFile", str(empty)),))
        session = await _session(settings, None)
        with pytest.raises(openssh.SessionEnded):
            await asyncio.wait_for(session.established(), 10)
        assert await session.exited() == 255
        assert "Host key verification failed." in session.stderr
        assert openssh.SshFailure.from_output(session.stderr, 255, settings, ever_up=False).kind == (
            "host_key_unknown"
        )
        await session.close()
        settings = paramiko_settings(head, remote_port)
        config = await openssh.read_config(settings)
        for delay in (None, 0.0, 0.01, 0.05, 0.1, 0.2):
            session = await ParamikoSession.start(settings, config, master_port=None, remote_port=remote_port)
            if delay is not None:
                await asyncio.sleep(delay)
            code = await asyncio.wait_for(session.close(), 30)  # a hang guard, not a timing goal
            assert code is not None and code < 0 and not session.running

    drive(body)
    wait_for(lambda: not head.sessions(), 10, "the head's sshd sessions to end")


def test_known_hosts_entries_as_ssh_reads_them(head, tmp_path):
    """[host]:port, hashed (ssh-keygen -H), wildcard and negated entries match as they do for ssh."""
    config = openssh.SshConfig.parse(
        subprocess.run(
            ["ssh", "-F", str(head.ssh_config), "-G", "headnode"], capture_output=True, text=True
        ).stdout
    )
    name = host_key_name(config)
    assert name == f"[127.0.0.1]:{head.port}"
    assert list(known_host_keys([str(head.known_hosts)], name)) == ["ssh-ed25519"]
    assert not known_host_keys([str(head.known_hosts)], "127.0.0.1"), "the port is part of the name"
    hashed = tmp_path / "hashed"
    hashed.write_text(head.known_hosts.read_text())
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(hashed)], check=True, capture_output=True)
    assert head.host.encode() not in hashed.read_bytes()
    assert list(known_host_keys([str(hashed)], name)) == ["ssh-ed25519"]
    key = head.known_hosts.read_text().split(" ", 1)[1]
    patterns = tmp_path / "patterns"
    patterns.write_text(f"# comment\n@revoked * {key}garbage line\n[127.0.0.*]:*,!*:1 {key}")
    assert list(known_host_keys([str(patterns), str(tmp_path / "missing")], name)) == ["ssh-ed25519"]
    assert not known_host_keys([str(patterns)], "[127.0.0.1]:1")


def test_bulk_data_crosses_the_forward_intact(head, remote_port):
    """8 MiB sent into the head's remote port reach the master port and come back intact and in order."""
    payload = os.urandom(8 * 1024 * 1024)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def body() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        echo_port = server.sockets[0].getsockname()[1]
        session = await _session(paramiko_settings(head, remote_port), echo_port)
        try:
            await asyncio.wait_for(session.established(), 10)
            reader, writer = await asyncio.open_connection("127.0.0.1", remote_port)

            async def send() -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()

            sending = asyncio.create_task(send())
            received = await asyncio.wait_for(reader.read(), 60)
            await sending
            writer.close()
            await writer.wait_closed()
            assert len(received) == len(payload), "bytes were lost or added"
            assert received == payload, "the data changed on the way"
        finally:
            await session.close()
            server.close()
            await server.wait_closed()

    drive(body)

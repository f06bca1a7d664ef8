"""The paramiko backend's routes and its independence from the ssh client, against real sshds on loopback.

ProxyJump goes through a second sshd (the jump host), ProxyCommand through a
real command, and a whole supervised run happens with no ``ssh`` on ``PATH``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from wqsupervisor import supervise
from wqsupervisor.backends import sessions_for
from wqsupervisor.config import Settings
from wqsupervisor.harness.sandbox import HeadNode
from wqsupervisor.paramiko_backend import ParamikoSession
from wqsupervisor.paramiko_config import read_head
from wqsupervisor.process import pid_alive
from wqsupervisor.session import FailureKind, SessionEnded, SessionFailure

from support import (
    assert_exactly_once,
    drive,
    echo_back,
    free_port,
    head_argv,
    holding,
    listening,
    python_env,
    run_tasks,
    ssh_entry,
    wait_for,
)


@pytest.fixture
def inner(tmp_path: Path) -> Iterator[HeadNode]:
    """A second sshd on loopback, the head node reached through the jump host."""
    with HeadNode(str(tmp_path / "inner")) as node:
        yield node


def _owners_of_connections_to(port: int) -> set[int]:
    """The processes holding an established TCP connection to 127.0.0.1:``port`` (this machine, root)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    inodes.add(f"socket:[{fields[9]}]")
    owners = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if links & inodes:
            owners.add(int(pid))
    return owners


def test_proxyjump_carries_the_tunnel_through_the_jump_hosts_sshd(head, inner, master, workers, tmp_path):
    """The head is reached only through the jump's sshd (its own entry and key check); tasks run through it."""
    config = tmp_path / "ssh_config"
    config.write_text(ssh_entry("jumphost", head) + ssh_entry("inner", inner, "ProxyJump jumphost"))
    remote_port = free_port()
    settings = Settings(
        via="inner",
        ssh_config=str(config),
        backend="paramiko",
        remote_port=remote_port,
        allow_no_password=True,
    )
    with supervise(master, settings) as sup:
        assert sup.wait_until_up(30), sup.failure
        # The inner sshd's client is the jump's sshd session, not this machine's supervisor.
        owners = _owners_of_connections_to(inner.port)
        assert owners and owners <= set(head.sessions()), (owners, head.sessions())
        assert sup._agent.pid not in owners
        workers(remote_port, n=1)
        assert_exactly_once(run_tasks(master, 10), 10)
    wait_for(lambda: not head.sessions() and not inner.sessions(), 10, "both sshds' sessions to end")

    found: list[tuple[object, int | None, int | None]] = []

    async def probe() -> None:
        sessions = sessions_for(settings)
        await sessions.prepare(str(tmp_path), "t")
        up = (await sessions.run_on_head("true", b"", 20, fresh=True)).status
        head.stop()
        down = (await sessions.run_on_head("true", b"", 20, fresh=True)).status
        found.append((sessions.head, up, down))

    drive(probe)
    assert found == [(None, 0, None)], "the head probe goes through the jump too, and fails with it"


def _failure_of(settings: Settings) -> SessionFailure:
    """How a paramiko session with ``settings`` ends (it must end before it is up)."""
    found: list[SessionFailure] = []

    async def body() -> None:
        target = settings.ssh_target()
        session = await ParamikoSession.start(target, read_head(target), master_port=None, remote_port=1)
        try:
            with pytest.raises(SessionEnded):
                await asyncio.wait_for(session.established(), 30)
            found.append(session.failure())
        finally:
            await session.close()

    drive(body)
    return found[0]


def test_the_jump_hosts_own_key_is_checked_and_named(head, inner, tmp_path):
    """A jump host whose key is unknown is refused for good, and the error names the jump, not the head."""
    empty = tmp_path / "empty"
    empty.write_text("")
    config = tmp_path / "ssh_config"
    jump = ssh_entry("jumphost", head, known_hosts=empty)
    config.write_text(jump + ssh_entry("inner", inner, "ProxyJump jumphost"))
    failure = _failure_of(Settings(via="inner", ssh_config=str(config)))
    assert failure.kind is FailureKind.HOST_KEY_UNKNOWN and failure.permanent
    assert "the host key of jumphost" in failure.message, failure.message
    assert not inner.sessions(), "nothing reached the head"
    wait_for(lambda: not head.sessions(), 10, "the jump's sshd sessions to end")


_BRIDGE = textwrap.dedent(
    """
    import os, socket, sys, threading
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    with open(sys.argv[3], "w") as f:
        f.write(str(os.getpid()))
    def up():
        while data := os.read(0, 65536):
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    threading.Thread(target=up, daemon=True).start()
    while data := s.recv(65536):
        os.write(1, data)
    """
)


def test_proxycommand_carries_the_forward_and_ends_with_the_session(head, tmp_path):
    """A ProxyCommand (a real relay process, run by sh) carries the session and forward; closing ends it."""
    bridge, marker = tmp_path / "bridge.py", tmp_path / "bridge.pid"
    bridge.write_text(_BRIDGE)
    config = tmp_path / "ssh_config"
    config.write_text(ssh_entry("viacommand", head, f"ProxyCommand {sys.executable} {bridge} %h %p {marker}"))
    settings = Settings(via="viacommand", ssh_config=str(config))
    payload = os.urandom(256 * 1024)

    async def body() -> None:
        server = await asyncio.start_server(echo_back, "127.0.0.1", 0)
        target = settings.ssh_target()
        remote_port = free_port()
        session = await ParamikoSession.start(
            target, read_head(target), master_port=server.sockets[0].getsockname()[1], remote_port=remote_port
        )
        try:
            await asyncio.wait_for(session.established(), 30)
            assert session.sock is None, "the proxy command's pipe, not a socket of ours"
            relay = int(marker.read_text())
            assert pid_alive(relay)
            reader, writer = await asyncio.open_connection("127.0.0.1", remote_port)
            writer.write(payload)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 60) == payload
            writer.close()
        finally:
            await session.close()
            server.close()
            await server.wait_closed()
        await asyncio.to_thread(wait_for, lambda: not pid_alive(relay), 10, "the proxy command to end")

    drive(body)
    wait_for(lambda: not head.sessions(), 10, "the head's sshd sessions to end")


def test_a_supervised_run_needs_no_ssh_client(head, master, workers, tmp_path):
    """No ssh on PATH: attach with paramiko frees the port from a stale session, forwards, and tasks run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, real in (("python3", sys.executable), ("sh", "/bin/sh")):
        (bin_dir / name).symlink_to(real)
    assert not (bin_dir / "ssh").exists()
    env = python_env()
    env["PATH"] = str(bin_dir)
    remote_port = free_port()
    argv = head_argv("attach", head, remote_port, "--master-port", str(master.port), "--allow-no-password")
    argv += ["--backend", "paramiko", "--connect-timeout", "5", "--log-format", "json"]
    # A session process of ours holding the remote port, as a dead supervisor's would: the
    # tunnel must look at it on the head and end it, over paramiko.
    lines: list[str] = []
    with holding(tmp_path, "sshd-session", remote_port) as stale:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        assert proc.stderr is not None
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
        reader.start()
        try:
            assert stale.wait(30) == -signal.SIGTERM, "the stale session was not ended"
            wait_for(lambda: _events(lines, "tunnel.up"), 30, "the tunnel to be up")
            workers(remote_port, n=1)
            assert_exactly_once(run_tasks(master, 10), 10)
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        finally:
            proc.kill()
            proc.wait()
            reader.join(10)
            proc.stderr.close()
    err = "".join(lines)
    assert proc.returncode == 0, err
    assert [e["pid"] for e in _events(lines, "tunnel.port_reclaimed")] == [stale.pid], err
    assert len(_events(lines, "tunnel.up")) == 1, err
    assert not listening(remote_port)


def _events(lines: list[str], name: str) -> list[dict[str, object]]:
    """The JSON log events called ``name`` among ``lines``."""
    found = [json.loads(line) for line in list(lines) if line.startswith("{")]
    return [e for e in found if e["event"] == name]

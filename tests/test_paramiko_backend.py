"""The paramiko transport's own parts: allocation, probe channels, host keys, failures from its exceptions.

The tunnel behaviour every transport shares is tested once, for each of them, in ``test_tunnel.py``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import Any

import paramiko
import pytest

from wqsupervisor.config import Settings
from wqsupervisor.harness.sandbox import HeadNode
from wqsupervisor.paramiko_backend import ParamikoSession, failure_of
from wqsupervisor.paramiko_config import read_head
from wqsupervisor.session import FailureKind, SessionEnded
from wqsupervisor.sshkeys import known_host_keys
from wqsupervisor.tcpconn import ConnectFailed

from support import drive, echo_back, free_port, listening, wait_for


def paramiko_settings(head: HeadNode, remote_port: int, **options: Any) -> Settings:
    """The sandbox head node's settings with the paramiko backend."""
    return head.settings(remote_port=remote_port, backend="paramiko", **options)


async def _session(settings: Settings, master_port: int | None) -> ParamikoSession:
    target = settings.ssh_target()
    config = read_head(target)
    assert settings.remote_port is not None
    return await ParamikoSession.start(
        target, config, master_port=master_port, remote_port=settings.remote_port
    )


def test_allocated_port_and_refused_probe(head, master):
    """remote_port=0: the head picks a port and the session says which; a probe to nothing is refused."""

    async def body() -> None:
        session = await _session(paramiko_settings(head, 0), master.port)
        try:
            await asyncio.wait_for(session.established(), 10)
            port = session.allocated_port
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


def test_a_head_command_that_writes_much_to_stderr_ends(head, remote_port):
    """Both streams are read as they come: 3 MB on stderr (more than the channel's window) before the
    first byte on stdout does not stall the command until its timeout."""

    async def body() -> None:
        session = await _session(paramiko_settings(head, remote_port), None)
        try:
            await asyncio.wait_for(session.established(), 10)
            command = "head -c 3000000 /dev/zero | tr '\\0' x >&2; echo done"
            ran = await session.run(command, b"", 20)
        finally:
            await session.close()
        assert (ran.status, ran.out.strip(), len(ran.err)) == (0, "done", 3000000), ran.err[-300:]

    drive(body)


def test_failed_start_and_close_while_connecting_leave_nothing(head, remote_port, tmp_path):
    """A refused host key and a close() in the middle of connecting both end cleanly, and say why."""

    async def body() -> None:
        empty = tmp_path / "known_hosts"
        empty.write_text("")
        settings = paramiko_settings(head, remote_port, ssh_options=(("UserKnownHostsFile", str(empty)),))
        session = await _session(settings, None)
        with pytest.raises(SessionEnded):
            await asyncio.wait_for(session.established(), 10)
        assert await session.exited() == 255
        assert "Host key verification failed." in session.stderr
        assert session.failure().kind == "host_key_unknown"
        await session.close()
        settings = paramiko_settings(head, remote_port)
        target = settings.ssh_target()
        config = read_head(target)
        for delay in (None, 0.0, 0.01, 0.05, 0.1, 0.2):
            session = await ParamikoSession.start(target, config, master_port=None, remote_port=remote_port)
            if delay is not None:
                await asyncio.sleep(delay)
            code = await asyncio.wait_for(session.close(), 30)  # a hang guard, not a timing goal
            assert code is not None and code < 0 and not session.running

    drive(body)
    wait_for(lambda: not head.sessions(), 10, "the head's sshd sessions to end")


def test_known_hosts_entries_as_ssh_reads_them(head, tmp_path):
    """[host]:port, hashed (ssh-keygen -H), wildcard and negated entries match as they do for ssh."""
    name = read_head(head.settings().ssh_target()).host_key_name
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

    async def body() -> None:
        server = await asyncio.start_server(echo_back, "127.0.0.1", 0)
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


# -- failures, from paramiko's own exceptions ------------------------------------------------------


def _direct(head: HeadNode, remote_port: int, **changes: Any) -> Settings:
    """The head node by address and key, with ``changes`` applied."""
    return (
        paramiko_settings(head, remote_port)
        .replace(
            ssh_config=None,
            via=f"{head.user}@127.0.0.1",
            ssh_port=head.port,
            identity=str(head.identity),
            ssh_options=(("UserKnownHostsFile", str(head.known_hosts)), ("IdentitiesOnly", "yes")),
        )
        .replace(**changes)
    )


def _failure_of_real_session(settings: Settings, master_port: int | None) -> Any:
    async def body() -> Any:
        session = await _session(settings, master_port)
        try:
            with pytest.raises(SessionEnded):
                await asyncio.wait_for(session.established(), 20)
            assert await session.exited() == 255
            return session.failure()
        finally:
            await session.close()

    found: list[Any] = []

    async def run() -> None:
        found.append(await body())

    drive(run)
    return found[0]


@pytest.mark.parametrize(
    ("case", "kind", "permanent"),
    [
        ("wrong key", FailureKind.AUTH, True),
        ("unknown host key", FailureKind.HOST_KEY_UNKNOWN, True),
        ("changed host key", FailureKind.HOST_KEY_CHANGED, True),
        ("port taken", FailureKind.PORT_TAKEN, True),
        ("nothing listening", FailureKind.REFUSED, False),
        ("unknown host", FailureKind.RESOLVE, True),
        ("unknown jump host", FailureKind.RESOLVE, True),
    ],
)
def test_real_failures_are_classified_from_paramiko_exceptions(head, master, tmp_path, case, kind, permanent):
    """Each way a real connection to the loopback sshd fails maps to its kind, with a hint for the user."""
    remote_port = free_port()
    settings = _direct(head, remote_port)
    squatter = None
    if case == "wrong key":
        key = tmp_path / "stranger"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        settings = settings.replace(identity=str(key))
    elif case == "unknown host key":
        (tmp_path / "empty").write_text("")
        settings = settings.replace(ssh_options=(("UserKnownHostsFile", str(tmp_path / "empty")),))
    elif case == "changed host key":
        other = HeadNode(str(tmp_path / "other"), port=head.port)
        settings = settings.replace(ssh_options=(("UserKnownHostsFile", str(other.known_hosts)),))
    elif case == "port taken":
        import socket

        squatter = socket.socket()
        squatter.bind(("127.0.0.1", remote_port))
        squatter.listen()
    elif case == "nothing listening":
        settings = settings.replace(ssh_port=free_port())
    elif case == "unknown host":
        settings = settings.replace(via="nosuchhost.invalid")
    elif case == "unknown jump host":
        settings = settings.replace(ssh_options=(*settings.ssh_options, ("ProxyJump", "gateway.invalid")))
    try:
        failure = _failure_of_real_session(settings, master.port)
    finally:
        if squatter is not None:
            squatter.close()
    assert (failure.kind, failure.permanent) == (kind, permanent), failure
    assert failure.hint and failure.message
    if kind is FailureKind.PORT_TAKEN:
        assert failure.port == remote_port
    wait_for(lambda: not head.sessions(), 10, "the head's sshd sessions to end")


def test_exception_types_map_to_kinds(head):
    """paramiko's exception types (and ours) each map to one kind; the words are the session module's."""
    key = paramiko.PKey.from_path(str(head.identity))
    dest, where = "alice@head", "head port 22"
    cases = [
        (paramiko.AuthenticationException("Authentication failed."), FailureKind.AUTH),
        (paramiko.BadHostKeyException("head", key, key), FailureKind.HOST_KEY_CHANGED),
        (
            ConnectFailed(FailureKind.REFUSED, "connect to host head port 22: Connection refused"),
            FailureKind.REFUSED,
        ),
        (paramiko.SSHException("Error reading SSH protocol banner"), FailureKind.NETWORK),
        (EOFError(), FailureKind.NETWORK),
    ]
    for exc, kind in cases:
        assert failure_of(exc, dest, where, authenticated=False).kind is kind, exc
    lost = failure_of(ConnectionResetError("reset"), dest, where, authenticated=True)
    assert lost.kind is FailureKind.NETWORK and "closed by remote host" in lost.message

"""The head-node scripts that find and end stale sessions, run against real processes holding real ports.

They run each transport's way: a one-off ssh for OpenSSH, an exec channel for paramiko.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from wqsupervisor.backends import sessions_for
from wqsupervisor.harness.sandbox import HeadNode
from wqsupervisor.process import pid_alive
from wqsupervisor.remoteport import SESSION_NAMES, PortHolders, end_stale_session, inspect_port

from support import free_port, gone_supervisor, holding


def _inspect(head: HeadNode, backend: str, rundir: Path, port: int) -> PortHolders:
    """The holders of ``port`` as ``backend`` finds them on the head node."""

    async def body() -> PortHolders:
        sessions = sessions_for(head.settings(remote_port=port, backend=backend))
        await sessions.prepare(str(rundir), "t")
        return await inspect_port(sessions.run_on_head, port)

    return asyncio.run(body())


def _end(head: HeadNode, backend: str, rundir: Path, pid: int, port: int) -> bool:
    """Whether ``backend`` ended session ``pid`` holding ``port`` on the head node."""

    async def body() -> bool:
        sessions = sessions_for(head.settings(remote_port=port, backend=backend))
        await sessions.prepare(str(rundir), "t")
        return await end_stale_session(sessions.run_on_head, pid, port)

    return asyncio.run(body())


@pytest.mark.parametrize("backend", ["openssh", "paramiko"])
@pytest.mark.parametrize("name", SESSION_NAMES)
def test_a_stale_session_under_each_openssh_name_is_found_and_ended(head, tmp_path, name, backend):
    """A session process of any OpenSSH version (sshd, sshd-session, sshd-auth) holding the port is ended."""
    port = free_port()
    with holding(tmp_path, name, port) as proc:
        holders = _inspect(head, backend, tmp_path, port)
        assert holders.bound and [(h.pid, h.command) for h in holders.holders] == [(proc.pid, name)]
        assert holders.stale_candidates(set()) == [proc.pid]
        assert _end(head, backend, tmp_path, proc.pid, port)
        assert proc.wait(10) == -signal.SIGTERM


@pytest.mark.parametrize("backend", ["openssh", "paramiko"])
def test_a_session_that_no_longer_holds_the_port_is_left_alone(head, tmp_path, backend):
    """The pid names a session process, but not one holding this port (reused, moved on): it is not killed."""
    port, elsewhere = free_port(), free_port()
    with holding(tmp_path, "sshd-session", elsewhere) as proc:
        assert not _inspect(head, backend, tmp_path, port).bound
        assert not _end(head, backend, tmp_path, proc.pid, port)
        assert pid_alive(proc.pid) and proc.poll() is None


@pytest.mark.parametrize("backend", ["openssh", "paramiko"])
def test_a_foreign_program_holding_the_port_is_named_not_ended(head, tmp_path, backend):
    """A program that is no sshd session holds the port: it is no stale candidate, and the scripts refuse it."""
    port = free_port()
    with holding(tmp_path, "webapp", port) as proc:
        holders = _inspect(head, backend, tmp_path, port)
        assert holders.stale_candidates(set()) == []
        assert f"webapp (pid {proc.pid}" in holders.describe()
        assert not _end(head, backend, tmp_path, proc.pid, port)
        assert proc.poll() is None


# -- two supervisors on one port ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["openssh", "paramiko"])
def test_a_second_supervisor_on_a_live_tunnels_port_stops_and_names_the_first(head, master, backend):
    """The first tunnel's lease is fresh: the second supervisor fails naming it, and takes nothing from it."""
    import socket as sockets

    from wqsupervisor import StalePortReclaimed, WQSupervisorError, supervise
    from wqsupervisor.wqserver import WorkQueueServer

    port = free_port()
    events: list = []
    first = supervise(
        master, head.settings(remote_port=port, backend=backend, resume=False), on_event=events.append
    )
    try:
        assert first.wait_until_up(20)
        session = first.snapshot().masters[0].tunnel.remote_pid
        # Another master, never in wait(): it would not answer a probe through the first tunnel.
        with WorkQueueServer(name="wqs-second") as other:
            second = supervise(
                other, head.settings(remote_port=port, backend=backend, start_attempts=2, resume=False)
            )
            try:
                with pytest.raises(WQSupervisorError) as failed:
                    second.wait_until_up(30)
                error = str(failed.value)
                assert "held by another wqsupervisor's tunnel" in error, error
                assert f"host {sockets.gethostname()}, pid {first._agent.pid}," in error, error
            finally:
                second.close()
        assert first.snapshot().masters[0].tunnel.state.value == "up"
        assert first.snapshot().masters[0].tunnel.remote_pid == session, "the first tunnel was replaced"
        assert not [e for e in events if isinstance(e, StalePortReclaimed)]
        assert pid_alive(session)
    finally:
        first.close()


def test_a_tunnel_whose_supervisor_is_gone_is_still_reclaimed(head, master):
    """The first supervisor is SIGKILLed with its session hung: once its lease is old, the port is taken back."""
    from wqsupervisor import StalePortReclaimed, supervise

    port = free_port()
    with gone_supervisor(
        master, head.settings(remote_port=port, keepalive_interval=1.0, resume=False)
    ) as hung:
        events: list = []
        settings = head.settings(remote_port=port, resume=False)
        with supervise(master, settings, on_event=events.append) as second:
            assert second.wait_until_up(60), second.failure
            assert [e.pid for e in events if isinstance(e, StalePortReclaimed)] == [hung]


def test_a_lease_line_gives_its_age_its_stamp_and_its_owner():
    """The holder script's lease line: age and write time in the head's whole seconds, then the lease as
    written (owner words, then the port); a renewal is told by the write time, never by two rounded ages."""
    from wqsupervisor.remoteport import parse_holders

    text = (
        "me 1000\nbound\nholder 10 1000 sshd-session\nlease 10 3 1796387547 campus 4242 1796380000 1 46077\n"
    )
    lease = parse_holders(text).lease(10)
    assert lease is not None
    assert (lease.age, lease.stamp) == (3.0, 1796387547)
    assert (lease.owner.host, lease.owner.pid, lease.owner.keepalive) == ("campus", 4242, 1.0)
    assert parse_holders(text.replace("1796387547 ", "")).lease(10) is None  # an old line: no stamp

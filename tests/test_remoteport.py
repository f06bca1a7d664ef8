"""The head-node scripts that find and end stale sessions, run over ssh against real processes holding real ports."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from wqsupervisor.process import pid_alive
from wqsupervisor.remoteport import SESSION_NAMES, end_stale_session, inspect_port

from support import free_port, wait_for

_LISTEN = (
    "import socket, sys, time\n"
    "s = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
    "print('ready', flush=True)\n"
    "time.sleep(300)\n"
)


@contextmanager
def holding(tmp_path: Path, name: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """A real process whose /proc/PID/comm is ``name``, listening on 127.0.0.1:``port``."""
    exe = tmp_path / name
    exe.symlink_to(sys.executable)  # the kernel names a process after the file it ran
    with subprocess.Popen([str(exe), "-c", _LISTEN, str(port)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert wait_for(proc.stdout.readline, 30, "the holder to listen").strip() == "ready"
            assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == name
            yield proc
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", SESSION_NAMES)
def test_a_stale_session_under_each_openssh_name_is_found_and_ended(head, tmp_path, name):
    """A session process of any OpenSSH version (sshd, sshd-session, sshd-auth) holding the port is ended."""
    port = free_port()
    target = head.settings(remote_port=port).ssh_target()
    with holding(tmp_path, name, port) as proc:
        holders = asyncio.run(inspect_port(target, port))
        assert holders.bound and [(h.pid, h.command) for h in holders.holders] == [(proc.pid, name)]
        assert holders.stale_candidates(set()) == [proc.pid]
        assert asyncio.run(end_stale_session(target, proc.pid, port))
        assert proc.wait(10) == -signal.SIGTERM


def test_a_session_that_no_longer_holds_the_port_is_left_alone(head, tmp_path):
    """The pid names a session process, but not one holding this port (reused, moved on): it is not killed."""
    port, elsewhere = free_port(), free_port()
    target = head.settings(remote_port=port).ssh_target()
    with holding(tmp_path, "sshd-session", elsewhere) as proc:
        assert not asyncio.run(end_stale_session(target, proc.pid, port))
        assert pid_alive(proc.pid) and proc.poll() is None


def test_a_foreign_program_holding_the_port_is_named_not_ended(head, tmp_path):
    """A program that is no sshd session holds the port: it is no stale candidate, and the scripts refuse it."""
    port = free_port()
    target = head.settings(remote_port=port).ssh_target()
    with holding(tmp_path, "webapp", port) as proc:
        holders = asyncio.run(inspect_port(target, port))
        assert holders.stale_candidates(set()) == []
        assert f"webapp (pid {proc.pid}" in holders.describe()
        assert not asyncio.run(end_stale_session(target, proc.pid, port))
        assert proc.poll() is None

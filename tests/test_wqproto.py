"""The Work Queue wire protocol against real masters: status requests and the password handshake."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from wqsupervisor.errors import AuthenticationFailed, ProtocolError
from wqsupervisor.wqproto import Credentials, make_cookie, request_status, response_for

from support import debian_work_queue_path, python_env, wait_for

_MASTER = textwrap.dedent(
    """
    import sys
    from work_queue import Task, WorkQueue
    q = WorkQueue(port=0, name="proto-test")
    if sys.argv[1] != "-":
        q.specify_password_file(sys.argv[1])
    q.submit(Task("sleep 100"))
    print(q.port, flush=True)
    q.wait(60)
    """
)


def _status(port: int, password: bytes | None, request: str = "queue_status"):
    async def connect():
        return await asyncio.open_connection("127.0.0.1", port)

    return asyncio.run(
        request_status(connect, request, credentials=Credentials(password=password), timeout=5)
    )


@pytest.fixture
def password_master(tmp_path):
    """A real master (Debian's SWIG bindings) with a password, sitting in wait()."""
    pw = tmp_path / "pw"
    pw.write_bytes(b"correct horse battery\n")
    with subprocess.Popen(
        [sys.executable, "-c", _MASTER, str(pw)],
        stdout=subprocess.PIPE,
        text=True,
        stderr=subprocess.DEVNULL,
        env=python_env(debian_work_queue_path()),
    ) as proc:
        try:
            port = int(wait_for(proc.stdout.readline, 30, "the master's port"))
            yield port, pw.read_bytes(), proc.pid
        finally:
            proc.kill()
            proc.wait()


def test_the_handshake_math():
    """Cookies are 64 alphanumerics; the response is hex SHA1 of password, space, peer cookie."""
    cookie = make_cookie()
    assert len(cookie) == 64 and cookie.isalnum()
    # The password file's bytes are used as they are, trailing newline included.
    assert response_for(b"pw\n", b"xyz") == hashlib.sha1(b"pw\n xyz").hexdigest().encode()
    assert response_for(b"pw\n", b"xyz") != response_for(b"pw", b"xyz")


def test_status_with_the_right_password(password_master):
    """With the master's password file, the supervisor gets the master's status."""
    port, password, _ = password_master
    reply = _status(port, password)
    assert reply[0]["port"] == port and reply[0]["project"] == "proto-test"
    assert reply[0]["tasks_waiting"] + reply[0]["tasks_running"] >= 1


def test_status_with_a_wrong_password_is_refused(password_master):
    """A wrong password is an AuthenticationFailed that says the files differ."""
    port, _, _ = password_master
    with pytest.raises(AuthenticationFailed, match="different password files|refused"):
        _status(port, b"wrong\n")


def test_status_without_a_password_says_one_is_needed(password_master):
    """Asking a password-protected master without one names the missing setting."""
    port, _, _ = password_master
    with pytest.raises(AuthenticationFailed, match="asks for a password") as info:
        _status(port, None)
    assert "password_file" in info.value.hint


def test_a_password_for_a_master_without_one(tmp_path):
    """Offering a password to a master that has none is reported, not hung on."""
    with subprocess.Popen(
        [sys.executable, "-c", _MASTER, "-"],
        stdout=subprocess.PIPE,
        text=True,
        stderr=subprocess.DEVNULL,
        env=python_env(debian_work_queue_path()),
    ) as proc:
        try:
            port = int(wait_for(proc.stdout.readline, 30, "the master's port"))
            assert _status(port, None, "worker_status") == []
            with pytest.raises((AuthenticationFailed, ProtocolError)):
                _status(port, b"pw")
        finally:
            proc.kill()
            proc.wait()


def test_a_peer_that_never_stops_talking_is_cut_off_at_the_bound():
    """A reply that runs past 64 MiB is a ProtocolError, raised long before the timeout, not a memory leak."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        stop = threading.Event()

        def endless() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(64)
                chunk = b"x" * (1 << 20)
                try:
                    while not stop.is_set():
                        conn.sendall(chunk)
                except OSError:
                    pass  # the client hung up: that is the point

        talker = threading.Thread(target=endless, daemon=True)
        talker.start()
        started = time.monotonic()
        try:
            with pytest.raises(ProtocolError, match="longer than 64 MiB"):
                _status(port, None)
        finally:
            stop.set()
            talker.join(10)
        assert time.monotonic() - started < 5, "cut off by the bound, not by the timeout"
        assert not talker.is_alive()


def test_a_handshake_later_than_the_peek_still_says_a_password_is_needed(password_master):
    """A password master that greets only after the 50 ms peek (busy, or a loaded machine) is still named as such."""
    port, _, pid = password_master
    os.kill(pid, signal.SIGSTOP)  # the kernel still accepts; the master's greeting waits for SIGCONT
    waker = threading.Timer(0.3, os.kill, (pid, signal.SIGCONT))
    waker.start()
    try:
        with pytest.raises(AuthenticationFailed, match="asks for a password") as info:
            _status(port, None)
        assert "password_file" in info.value.hint
    finally:
        waker.join()
        os.kill(pid, signal.SIGCONT)

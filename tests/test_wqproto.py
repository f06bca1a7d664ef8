"""The Work Queue wire protocol against real masters: status requests and the password handshake."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import textwrap

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
            yield port, pw.read_bytes()
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
    port, password = password_master
    reply = _status(port, password)
    assert reply[0]["port"] == port and reply[0]["project"] == "proto-test"
    assert reply[0]["tasks_waiting"] + reply[0]["tasks_running"] >= 1


def test_status_with_a_wrong_password_is_refused(password_master):
    """A wrong password is an AuthenticationFailed that says the files differ."""
    port, _ = password_master
    with pytest.raises(AuthenticationFailed, match="different password files|refused"):
        _status(port, b"wrong\n")


def test_status_without_a_password_says_one_is_needed(password_master):
    """Asking a password-protected master without one names the missing setting."""
    port, _ = password_master
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

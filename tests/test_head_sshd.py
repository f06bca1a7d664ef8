"""The head-node port scripts and the hung-peer reclaim against real sshd builds: Debian's 9.2 and OpenSSH 9.8+.

From OpenSSH 9.8 a connection is served by ``sshd-session`` processes (a root
``[postauth]`` monitor and the user's child that holds the remote port), and
sshd penalises addresses whose connections leave before authenticating. The
``newer`` cases need such an sshd, which Debian bookworm (and so CI) does not
ship: they run against ``$WQS_SSHD`` or ``/opt/openssh-new/sbin/sshd`` when
that is OpenSSH 9.8 or later, and skip only when there is none. They are of
plain sessions (``resume=False``): the relay has its own, in test_resumable.py.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from wqsupervisor import StalePortReclaimed, supervise
from wqsupervisor.backends import sessions_for
from wqsupervisor.harness.sandbox import SSHD_ENV, HeadNode
from wqsupervisor.headprobe import head_returns
from wqsupervisor.process import pid_alive
from wqsupervisor.remoteport import SESSION_NAMES, HeadRunner, end_stale_session, inspect_port

from support import free_port, listening, wait_for

T = TypeVar("T")

NEWER_SSHD_DEFAULT = "/opt/openssh-new/sbin/sshd"
BUILD_HINT = (
    "needs OpenSSH 9.8 or later as the head's sshd (Debian bookworm ships 9.2, CI cannot install it): "
    "build openssh-portable (tag V_10_5_P1) with ./configure --prefix=/opt/openssh-new "
    "--sysconfdir=/opt/openssh-new/etc --with-privsep-path=/opt/openssh-new/var/empty "
    f"--without-pam && make install, or point {SSHD_ENV} at one"
)


def _version(sshd: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([sshd, "-V"], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    m = re.search(r"OpenSSH_(\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else None


def newer_sshd() -> str | None:
    """An sshd of OpenSSH 9.8 or later on this machine, if there is one."""
    for sshd in (os.environ.get(SSHD_ENV), NEWER_SSHD_DEFAULT):
        if sshd and os.path.isabs(sshd) and (_version(sshd) or (0, 0)) >= (9, 8):
            return sshd
    return None


@pytest.fixture(params=["debian", "newer"])
def sshd_build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which sshd the head node runs: the machine's (Debian's 9.2), or a 9.8+ build (skipped without one)."""
    if request.param == "debian":
        monkeypatch.delenv(SSHD_ENV, raising=False)
        return "debian"
    sshd = newer_sshd()
    if sshd is None:
        pytest.skip(BUILD_HINT)
    monkeypatch.setenv(SSHD_ENV, sshd)
    return "newer"


@pytest.fixture
def login_user() -> Iterator[str]:
    """A throwaway unprivileged user with its own home (a head node's users are not root), removed afterwards."""
    if os.geteuid() != 0:
        pytest.fail("creating a throwaway head-node user needs root; CI runs as root")
    name = f"wqs{uuid.uuid4().hex[:8]}"
    home = Path(tempfile.mkdtemp(prefix=f"{name}-home-"))
    # "*" and not the locked "!": sshd refuses locked accounts when it runs without PAM.
    account = ["--no-create-home", "--no-user-group", "--password", "*", "--shell", "/bin/sh"]
    subprocess.run(["useradd", *account, "--home-dir", str(home), name], check=True)
    try:
        os.chown(home, pwd.getpwnam(name).pw_uid, -1)
        yield name
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        wait_for(
            lambda: subprocess.run(["pgrep", "-u", name], capture_output=True).returncode == 1,
            10,
            "no process of the user",
        )
        subprocess.run(["userdel", name], check=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def build_head(sshd_build: str) -> Iterator[HeadNode]:
    """The loopback head node, run by the chosen sshd."""
    with HeadNode() as node:
        yield node


@pytest.fixture
def head_for_user(sshd_build: str, login_user: str) -> Iterator[HeadNode]:
    """The loopback head node, run by the chosen sshd and logged into as the throwaway user."""
    with HeadNode(user=login_user) as node:
        yield node


def _session_processes(pid: int, listener: int) -> list[int]:
    """The session child ``pid`` and, above it, the connection's monitor (never the listener)."""
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    monitor = ppid != listener and Path(f"/proc/{ppid}/comm").read_text().strip() in SESSION_NAMES
    return [pid, ppid] if monitor else [pid]


def _greeting_session(head: HeadNode, *args: str) -> tuple[subprocess.Popen[str], int]:
    """An ssh session to the head that prints its sshd's pid (the remote command's parent) and then waits."""
    proc = subprocess.Popen(
        head.ssh_argv(*args, "echo wqs-session $PPID; exec cat"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = wait_for(proc.stdout.readline, 30, "the session's greeting")
    assert line.startswith("wqs-session "), line
    return proc, int(line.split()[1])


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


def _on_head(head: HeadNode, port: int, call: Callable[[HeadRunner], Awaitable[T]]) -> T:
    """``call`` with the head's command runner (the default transport's, as the tunnel has it)."""

    async def body() -> T:
        sessions = sessions_for(head.settings(remote_port=port, resume=False))
        with tempfile.TemporaryDirectory() as rundir:
            await sessions.prepare(rundir, "t")
            return await call(sessions.run_on_head)

    return asyncio.run(body())


def test_a_real_tunnel_session_is_found_under_its_name_and_ended(sshd_build, build_head):
    """A real `ssh -R` session holds the port: the holder script names its sshd process, the end script ends it."""
    head = build_head
    port = free_port()
    proc, sshd_pid = _greeting_session(head, "-T", "-R", f"{port}:localhost:{free_port()}")
    try:
        wait_for(lambda: listening(port), 10, "the remote port")
        holders = _on_head(head, port, lambda run: inspect_port(run, port))
        expected = "sshd" if sshd_build == "debian" else "sshd-session"
        assert [(h.pid, h.command) for h in holders.holders] == [(sshd_pid, expected)]
        assert holders.stale_candidates(set()) == [sshd_pid]
        assert _on_head(head, port, lambda run: end_stale_session(run, sshd_pid, port))
        assert proc.wait(10) != 0
        wait_for(lambda: not listening(port), 10, "the port freed")
    finally:
        _end(proc)


@pytest.mark.parametrize("as_root", [True, False], ids=["root", "user"])
def test_a_hung_session_is_reclaimed_and_the_forward_comes_back(sshd_build, master, as_root, request):
    """The tunnel's head session is SIGSTOPped (child and monitor): it stalls, is ended, the forward is back."""
    user = None if as_root else request.getfixturevalue("login_user")
    port = free_port()
    events: list[object] = []
    with HeadNode(user=user) as head:
        hung: list[int] = []
        try:
            with supervise(
                master, head.settings(remote_port=port, resume=False), on_event=events.append
            ) as sup:
                assert sup.wait_until_up(30), sup.failure
                session = sup.snapshot().masters[0].tunnel.remote_pid
                assert session is not None and head.proc is not None
                hung = _session_processes(session, head.proc.pid)
                for pid in hung:
                    os.kill(pid, signal.SIGSTOP)
                wait_for(
                    lambda: [e for e in events if isinstance(e, StalePortReclaimed) and e.pid == session],
                    60,
                    "the hung session's port reclaimed",
                )
                wait_for(
                    lambda: (
                        sup.snapshot().masters[0].tunnel.remote_pid not in (None, session)
                        and sup.snapshot().masters[0].tunnel.state.value == "up"
                    ),
                    60,
                    "the forward back on a new session",
                )
                assert not pid_alive(session)
        finally:
            for pid in hung:
                if pid_alive(pid):
                    os.kill(pid, signal.SIGCONT)


def test_an_interactive_login_is_never_ended_even_on_its_own_port(head_for_user):
    """An unprivileged user's login with a pty holds the port: the end script refuses it; a tunnel session it ends."""
    head = head_for_user
    port, other = free_port(), free_port()
    login, login_sshd = _greeting_session(head, "-tt", "-R", f"{port}:localhost:{free_port()}")
    tunnel = None
    try:
        wait_for(lambda: listening(port), 10, "the login's forwarded port")
        assert "@pts/" in Path(f"/proc/{login_sshd}/cmdline").read_bytes().decode(errors="replace")
        # The user cannot read the descriptors of its own sshd processes: only the pty tells it from a tunnel.
        assert not _on_head(head, port, lambda run: end_stale_session(run, login_sshd, port))
        assert pid_alive(login_sshd) and login.poll() is None and listening(port)
        tunnel, tunnel_sshd = _greeting_session(head, "-T", "-R", f"{other}:localhost:{free_port()}")
        wait_for(lambda: listening(other), 10, "the tunnel's forwarded port")
        assert _on_head(head, other, lambda run: end_stale_session(run, tunnel_sshd, other))
        assert tunnel.wait(10) != 0 and login.poll() is None
    finally:
        _end(login)
        if tunnel is not None:
            _end(tunnel)


def test_waiting_for_the_head_costs_no_penalty_on_a_newer_sshd(monkeypatch):
    """20 s of head probes against an OpenSSH 9.8+ sshd that answers: no penalty, and ssh still gets in."""
    sshd = newer_sshd()
    if sshd is None:
        pytest.skip(BUILD_HINT)
    monkeypatch.setenv(SSHD_ENV, sshd)
    from wqsupervisor.clock import SystemClock

    with HeadNode() as head:

        async def probe_for_a_while() -> None:
            sessions = sessions_for(head.settings(resume=False))
            with pytest.raises(TimeoutError):  # the head answers all along: nothing to wake up for
                await asyncio.wait_for(head_returns(sessions, SystemClock()), 20)

        asyncio.run(probe_for_a_while())
        penalties = [
            line for line in head.log.read_text().splitlines() if "activating" in line and "penalty" in line
        ]
        assert not penalties, penalties
        assert (
            subprocess.run(head.ssh_argv("true"), capture_output=True, timeout=30, check=False).returncode
            == 0
        )


def test_an_unprivileged_head_users_tunnels_know_each_other_by_their_leases(head_for_user, master):
    """As a head node's users are, unprivileged: sshd hides its sessions' sockets from them, so the holder
    of the port is found by the sessions' leases, which name the port. A second supervisor on a live
    tunnel's port stops naming the first and takes nothing from it; once the first supervisor is gone
    (SIGKILLed, its session hung) the second reclaims the port when the lease runs out."""
    from wqsupervisor import WQSupervisorError
    from wqsupervisor.wqserver import WorkQueueServer

    head, port = head_for_user, free_port()
    events: list[object] = []
    first = supervise(
        master, head.settings(remote_port=port, keepalive_interval=1.0, resume=False), on_event=events.append
    )
    hung = None
    try:
        assert first.wait_until_up(30), first.failure
        session = first.snapshot().masters[0].tunnel.remote_pid
        assert session is not None
        with WorkQueueServer(name="wqs-second") as other:  # never in wait(): it answers no probe
            second = supervise(other, head.settings(remote_port=port, start_attempts=2, resume=False))
            try:
                with pytest.raises(WQSupervisorError) as failed:
                    second.wait_until_up(30)
                assert "held by another wqsupervisor's tunnel" in str(failed.value), failed.value
                assert f"pid {first._agent.pid}," in str(failed.value), failed.value
            finally:
                second.close()
        assert first.snapshot().masters[0].tunnel.remote_pid == session, "the first tunnel was replaced"
        assert not [e for e in events if isinstance(e, StalePortReclaimed)]
        hung = session
        os.kill(hung, signal.SIGSTOP)
        os.kill(first._agent.pid, signal.SIGKILL)
    finally:
        first.close()
    try:
        seen: list[object] = []
        with supervise(master, head.settings(remote_port=port, resume=False), on_event=seen.append) as third:
            assert third.wait_until_up(60), third.failure
            assert [e.pid for e in seen if isinstance(e, StalePortReclaimed)] == [hung]
    finally:
        if hung is not None and pid_alive(hung):
            os.kill(hung, signal.SIGCONT)
            os.kill(hung, signal.SIGKILL)

"""The OpenSSH backend's pure parts: the command line, the config it reads, the errors it names."""

from __future__ import annotations

import asyncio

import pytest

from wqsupervisor.config import Settings
from wqsupervisor.openssh import (
    FAST_CIPHER,
    REMOTE_COMMAND,
    SshConfig,
    allocated_port,
    cipher_preference,
    classify,
    lease_command,
    read_config,
    tunnel_argv,
)

S = Settings(
    via="alice@head",
    remote_port=10001,
    ssh_port=2200,
    identity="/k",
    ssh_options=(("ServerAliveInterval", "30"),),
)
T = S.ssh_target()


def _options(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]


def test_the_tunnel_command_line():
    """A session with a waiting command (not -N), the reverse forward on loopback, the probe socket."""
    argv = tunnel_argv(T, master_port=9123, remote_port=10001, probe_path="/r/p.sock")
    assert argv[0] == "ssh" and "-N" not in argv and "-T" in argv
    assert argv[argv.index("-R") + 1] == "127.0.0.1:10001:localhost:9123"
    assert argv[argv.index("-L") + 1] == "/r/p.sock:127.0.0.1:10001"
    assert argv[-2:] == ["alice@head", lease_command(T.keepalive, 10001)]
    probe_only = tunnel_argv(T, master_port=None, remote_port=10001, probe_path="/r/p.sock")
    assert probe_only[-1] == REMOTE_COMMAND, "a probe-only session keeps no lease"
    assert argv[argv.index("-p") + 1] == "2200" and argv[argv.index("-i") + 1] == "/k"
    opts = _options(argv)
    for needed in ("BatchMode=yes", "ExitOnForwardFailure=yes", "ControlPath=none"):
        assert needed in opts
    assert not any(o.startswith("StrictHostKeyChecking") for o in opts), "host-key checking is the user's"


def test_user_options_win_over_our_defaults():
    """ssh keeps the first value of an option: the user's come before our ServerAlive defaults."""
    opts = _options(tunnel_argv(T, master_port=1, remote_port=2, probe_path=None))
    assert opts.index("ServerAliveInterval=30") < opts.index("ServerAliveInterval=15")


def test_the_remote_command_ends_with_its_session_and_names_its_sshd():
    """cat reads the channel (it ends when the session does); $PPID is the head's sshd session."""
    assert "exec cat" in REMOTE_COMMAND and "sleep" not in REMOTE_COMMAND
    assert "$PPID" in REMOTE_COMMAND


def test_the_lease_command_greets_echoes_renews_and_removes_its_lease(tmp_path):
    """Run by sh as sshd would: the greeting, every ping echoed, the lease renewed per ping, gone at the end."""
    import os
    import socket
    import subprocess

    command = lease_command(2.5)
    stale = tmp_path / ".wqsupervisor" / "sessions" / "4194999"  # above any pid: a session long gone
    stale.parent.mkdir(parents=True)
    stale.write_text("elsewhere 1 2 5\n")
    proc = subprocess.Popen(
        ["sh", "-c", command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    try:
        greeting = proc.stdout.readline().split()
        assert greeting == ["wqs-session", str(os.getpid())]
        lease = tmp_path / ".wqsupervisor" / "sessions" / str(os.getpid())
        assert lease.read_text().split()[:2] == [socket.gethostname(), str(os.getpid())]
        assert lease.read_text().split()[3] == "2.5"
        assert not stale.exists(), "a dead session's lease was left"
        os.utime(lease, (0, 0))
        proc.stdin.write("wqs-ping 7\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "wqs-ping 7\n"
        assert lease.stat().st_mtime > 0, "the ping renewed the lease"
        proc.stdin.close()
        assert proc.wait(10) == 0
        assert not lease.exists()
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            stream.close()


def test_reading_ssh_g_output():
    """ssh -G output is read into host, port, user and options (first value wins)."""
    cfg = SshConfig.parse("user alice\nhostname 10.0.0.5\nport 2222\nciphers a,b\nproxyjump none\n")
    assert (cfg.hostname, cfg.port, cfg.user, cfg.options["ciphers"]) == ("10.0.0.5", 2222, "alice", "a,b")
    assert not cfg.proxied
    assert SshConfig.parse("hostname h\nproxyjump gw\n").proxied


def test_fast_cipher_preferred_unless_the_user_chose(tmp_path):
    """aes128-gcm goes first when the user did not choose ciphers; a Ciphers setting anywhere wins."""
    plain = tmp_path / "plain"
    plain.write_text("Host head\n  HostName 127.0.0.1\n")
    chosen = tmp_path / "chosen"
    chosen.write_text("Host head\n  HostName 127.0.0.1\n  Ciphers chacha20-poly1305@openssh.com\n")

    async def pref(settings: Settings) -> list[str]:
        target = settings.ssh_target()
        return await cipher_preference(target, await read_config(target))

    base = Settings(via="head", remote_port=1)
    assert asyncio.run(pref(base.replace(ssh_config=str(plain)))) == ["-o", f"Ciphers=^{FAST_CIPHER}"]
    assert asyncio.run(pref(base.replace(ssh_config=str(chosen)))) == []
    assert (
        asyncio.run(pref(base.replace(ssh_config=str(plain), ssh_options=(("Ciphers", "aes256-ctr"),)))) == []
    )


# What OpenSSH 9.2 printed in each case (captured from real runs against a loopback sshd).
REAL = {
    "port_taken": "Error: remote port forwarding failed for listen port 10001\n",
    "auth": "root@127.0.0.1: Permission denied (publickey).\n",
    "host_key_unknown": "Host key verification failed.\n",
    "host_key_changed": (
        "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
        "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
        "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
        "Host key for [127.0.0.1]:2222 has changed and you have requested strict checking.\n"
        "Host key verification failed.\n"
    ),
    "refused": "ssh: connect to host 127.0.0.1 port 2299: Connection refused\n",
    "unknown_host": "ssh: Could not resolve hostname nosuchhost.invalid: Name or service not known\n",
    "network": "Connection to 127.0.0.1 closed by remote host.\n",
    "config": "command-line: line 0: Bad configuration option: nosuchoption\n",
}


@pytest.mark.parametrize(
    ("kind", "permanent"),
    [
        ("port_taken", True),
        ("auth", True),
        ("host_key_unknown", True),
        ("host_key_changed", True),
        ("refused", False),
        ("unknown_host", True),
        ("network", False),
        ("config", True),
    ],
)
def test_ssh_errors_are_classified(kind, permanent):
    """Each real ssh error maps to its kind; permanent ones are not retried; each has a hint."""
    failure = classify(REAL[kind], 255, T, ever_up=False)
    assert (failure.kind, failure.permanent) == (kind, permanent)
    assert failure.hint


def test_a_name_lookup_failure_after_the_tunnel_was_up_is_transient():
    """DNS fails for a while after a network change; a tunnel that has been up keeps retrying."""
    assert not classify(REAL["unknown_host"], 255, T, ever_up=True).permanent


def test_killed_ssh_is_described_by_its_signal():
    """An ssh that died of a signal says which one."""
    assert classify("", -9, T, ever_up=True).message == "ssh ended (killed by SIGKILL)"


def test_allocated_port_is_read_from_stderr():
    """-R 0 makes sshd choose; ssh prints the choice on stderr."""
    assert allocated_port("Allocated port 41234 for remote forward to localhost:9123\n") == 41234
    assert allocated_port("nothing here") is None


def test_the_lease_directory_is_private(tmp_path):
    """The first lease on a head node creates ~/.wqsupervisor/sessions readable by its user only."""
    import os
    import subprocess

    done = subprocess.run(
        ["sh", "-c", lease_command(5)],
        input="",
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(tmp_path)},
        timeout=10,
        check=True,
    )
    assert done.stdout.startswith("wqs-session ")
    folder = tmp_path / ".wqsupervisor" / "sessions"
    assert (folder.stat().st_mode & 0o777) == 0o700 and not list(folder.iterdir())

"""The paramiko backend's reading of the ssh config and known_hosts, held against OpenSSH's own.

``ssh -G`` is the oracle: each config below is read both ways and must agree
on everything the backend uses. Host keys are checked against a real sshd.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from wqsupervisor.config import Settings
from wqsupervisor.errors import TunnelError
from wqsupervisor.harness.sandbox import HeadNode
from wqsupervisor.openssh import SshConfig, base_argv
from wqsupervisor.paramiko_backend import ParamikoSession
from wqsupervisor.paramiko_config import HostConfig, read_head, read_hop
from wqsupervisor.session import FailureKind, SessionEnded, SessionFailure
from wqsupervisor.target import SshTarget

from support import drive, free_port, wait_for


def ssh_g(target: SshTarget) -> SshConfig:
    """What OpenSSH says it would do for ``target`` (every IdentityFile line kept, in order)."""
    out = subprocess.run(
        [*base_argv(target), "-G", target.destination], capture_output=True, text=True, check=True
    ).stdout
    config = SshConfig.parse(out)
    identities = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("identityfile ")]
    config.options["identityfile"] = "\n".join(identities)
    return config


def assert_same(ours: HostConfig, theirs: SshConfig) -> None:
    """Every field the backend uses agrees with ``ssh -G``."""
    o = theirs.options
    assert (ours.hostname, ours.port, ours.user) == (theirs.hostname, theirs.port, theirs.user)
    assert list(ours.identity_files) == [os.path.expanduser(p) for p in o["identityfile"].split("\n")]
    known = [*o["userknownhostsfile"].split(), *o["globalknownhostsfile"].split()]
    assert list(ours.known_hosts_files) == [os.path.expanduser(p) for p in known if p != "none"]
    assert ours.host_key_alias == o.get("hostkeyalias")
    assert ",".join(ours.proxy_jump) == o.get("proxyjump", "")
    if "proxycommand" in o:
        command = o["proxycommand"].replace("%h", theirs.hostname).replace("%p", str(theirs.port))
        assert ours.proxy_command == command
    else:
        assert ours.proxy_command is None
    assert ours.identities_only == (o.get("identitiesonly") == "yes")


CONFIG = """\
Host alias
    HostName 127.0.0.9
    Port 2200
    IdentityFile ~/.ssh/first
    IdentityFile {tmp}/second
    UserKnownHostsFile ~/kh_one {tmp}/kh_%h_%p
    ProxyCommand nc %h %p
    ProxyJump ignored
    Include {tmp}/scoped.conf
Host jumped
    ProxyJump u@hop1:2022,hop2
    ProxyCommand ignored too
    IdentitiesOnly yes
Include {tmp}/top.conf
Host *
    User bob
    HostKeyAlias everyone
"""
SCOPED = """\
User scoped-user
Host alias jumped other
    Port 2300
    HostKeyAlias scoped
"""
TOP = """\
Host other
    HostName 10.1.2.3
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config with aliases, Include at the top and inside a block, both proxies, tokens."""
    (tmp_path / "scoped.conf").write_text(SCOPED)
    (tmp_path / "top.conf").write_text(TOP)
    path = tmp_path / "config"
    path.write_text(CONFIG.format(tmp=tmp_path))
    return path


@pytest.mark.parametrize(
    ("destination", "port", "identity", "options"),
    [
        ("alias", None, None, ()),
        ("jumped", None, None, ()),
        ("carol@other", None, None, ()),
        ("plain.example", None, None, ()),
        ("alias", 2400, "given", (("User", "dave"), ("IdentityFile", "/keys/opt"))),
        ("jumped", None, None, (("ProxyJump", "none"),)),
        ("jumped", None, None, (("ProxyCommand", "none"),)),
        ("other", None, None, (("Port", "2500"), ("UserKnownHostsFile", "none"), ("HostKeyAlias", "x"))),
    ],
)
def test_the_config_is_read_as_ssh_reads_it(config, destination, port, identity, options):
    """Aliases, scoped and top Includes, first-wins, tokens, defaults and our settings' precedence agree with ssh -G."""
    if identity is not None:  # ssh drops an -i file that does not exist
        (config.parent / identity).write_text("")
        identity = str(config.parent / identity)
    target = SshTarget(destination, port=port, identity=identity, options=options, config_file=str(config))
    assert_same(read_head(target), ssh_g(target))


def test_without_a_config_file_the_users_and_the_systems_are_read_as_ssh_reads_them():
    """No ssh_config setting: ~/.ssh/config (if any), then /etc/ssh/ssh_config and its Includes, as ssh -G."""
    target = SshTarget("plain.example", options=(("Port", "2022"),))
    assert_same(read_head(target), ssh_g(target))


def test_a_hop_is_read_as_its_own_ssh_reads_it(config):
    """A ProxyJump hop gets its own entry, its user@ and :port first, and never the head's options."""
    hop = read_hop("carol@other:2022", str(config))
    assert_same(hop, ssh_g(SshTarget("carol@other", port=2022, config_file=str(config))))
    last = read_hop("hop2", str(config), jumps=["u@hop1:2022"])
    assert last.proxy_jump == ("u@hop1:2022",) and last.user == "bob"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("Host x\n  Port twenty\n", "the port 'twenty'"),
        ("Host x\n  =broken\n", "cannot read the ssh config"),
        ("Include {loop}\n", "includes too deeply"),
    ],
    ids=["bad-port", "unparsable", "include-loop"],
)
def test_a_bad_config_is_one_line_that_says_what_to_do(tmp_path, text, says):
    """A config paramiko cannot use is refused with what is wrong and what to do, never a traceback."""
    path = tmp_path / "config"
    path.write_text(text.format(loop=path))
    with pytest.raises(TunnelError) as failed:
        read_head(SshTarget("x", config_file=str(path)))
    assert says in failed.value.message
    assert failed.value.hint and "\n" not in str(failed.value)
    with pytest.raises(TunnelError, match="cannot read the ssh config"):
        read_head(SshTarget("x", config_file=str(tmp_path / "missing")))


# -- host keys against a real sshd --------------------------------------------------------------


def _failure(settings: Settings) -> SessionFailure | None:
    """How a paramiko session with ``settings`` ends, or None when it came up."""
    found: list[SessionFailure | None] = []

    async def body() -> None:
        target = settings.ssh_target()
        session = await ParamikoSession.start(target, read_head(target), master_port=None, remote_port=1)
        try:
            await asyncio.wait_for(session.established(), 20)
            found.append(None)
        except SessionEnded:
            found.append(session.failure())
        finally:
            await session.close()

    drive(body)
    return found[0]


def _ca(tmp_path: Path) -> str:
    key = tmp_path / "ca"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return Path(f"{key}.pub").read_text().strip()


def test_a_host_known_only_through_a_cert_authority_is_refused_in_one_line(head, tmp_path):
    """@cert-authority alone: refused for good with what to do; beside the host's own key it is harmless."""
    hosts, key = head.known_hosts.read_text().strip().split(" ", 1)
    known = tmp_path / "known_hosts"
    ca = _ca(tmp_path)
    known.write_text(f"@cert-authority {hosts} {ca}\n")
    settings = head.settings(ssh_options=(("UserKnownHostsFile", str(known)),))
    failure = _failure(settings)
    assert failure is not None
    assert failure.kind is FailureKind.HOST_KEY_UNKNOWN and failure.permanent
    assert "host certificates are not supported by the paramiko backend" in failure.message
    assert "known_hosts" in failure.hint and "openssh" in failure.hint
    known.write_text(f"@cert-authority {hosts} {ca}\n{hosts} {key}\n")
    assert _failure(settings) is None, "the host's own key is enough"
    wait_for(lambda: not head.sessions(), 10, "the head's sshd sessions to end")


def test_a_host_certificate_is_not_taken_for_the_host_key(tmp_path):
    """An sshd that presents a CA-signed host certificate: OpenSSH trusts the CA, paramiko refuses, never trusts it."""
    ca = tmp_path / "ca"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ca)], check=True)
    with HeadNode(str(tmp_path / "head"), port=free_port()) as node:
        node.stop()
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-s",
                str(ca),
                "-I",
                "head",
                "-h",
                "-n",
                "127.0.0.1",
                f"{node.host_key}.pub",
            ],
            check=True,
        )
        with node.sshd_config.open("a") as f:
            f.write(f"HostCertificate {node.host_key}-cert.pub\n")
        node.start()
        known = tmp_path / "known_hosts"
        authority = Path(f"{ca}.pub").read_text().strip()
        known.write_text(f"@cert-authority [127.0.0.1]:{node.port} {authority}\n")
        settings = node.settings(ssh_options=(("UserKnownHostsFile", str(known)),))
        ssh = subprocess.run(
            [*base_argv(settings.ssh_target()), "headnode", "true"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ssh.returncode == 0, f"OpenSSH should trust the CA: {ssh.stderr}"
        failure = _failure(settings)
        assert failure is not None and "host certificates are not supported" in failure.message
        wait_for(lambda: not node.sessions(), 10, "the head's sshd sessions to end")

"""The user's ssh config for the paramiko backend, read with paramiko's ``SSHConfig``: no ssh binary.

:func:`read_head` answers what ``ssh -G`` answers for the head node, as far as
the backend uses it (:class:`HostConfig`), and :func:`read_hop` the same for a
ProxyJump hop. Precedence is ssh's, first value wins: the supervisor's own
settings (``--ssh-port``, ``--identity``, ``--ssh-option``, the user of
``user@host``) come before the config files, and a hop's ``user@`` and
``:port`` before its own config entry (ssh passes them to the jump's ssh as
``-l`` and ``-p``; a hop never gets the head's ``--ssh-option``). The files are
the ``ssh_config`` setting (``ssh -F``) alone, else ``~/.ssh/config`` and then
``/etc/ssh/ssh_config``.

``SSHConfig`` leaves some of what ssh does to its caller, so it is done here:
``Include`` (inlined, see :func:`_inline`), OpenSSH's defaults (identity
files, known_hosts files, port, user), ``~`` and tokens in the known_hosts
file names, and which of ProxyJump and ProxyCommand came first.
"""

from __future__ import annotations

import getpass
import glob
import os
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from .errors import TunnelError
from .target import SshTarget

# Not in SSHConfig.lookup's answer: these are OpenSSH 9's defaults (readconf.c
# fill_default_options, ``ssh -G -F /dev/null``). The identities apply only when
# no IdentityFile was given anywhere, as in ssh.
DEFAULT_IDENTITIES = (
    "~/.ssh/id_rsa",
    "~/.ssh/id_ecdsa",
    "~/.ssh/id_ecdsa_sk",
    "~/.ssh/id_ed25519",
    "~/.ssh/id_ed25519_sk",
    "~/.ssh/id_xmss",
    "~/.ssh/id_dsa",
)
DEFAULT_USER_KNOWN_HOSTS = "~/.ssh/known_hosts ~/.ssh/known_hosts2"
DEFAULT_GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2"
SYSTEM_CONFIG = "/etc/ssh/ssh_config"
# ssh's own bound on nested Include files (READCONF_MAX_DEPTH), and ours on jump chains.
_MAX_DEPTH = 16
_KEY = re.compile(r"\s*(\w+)\s*(?:=\s*|\s+)(.*)")
_HOP = re.compile(r"^(?:ssh://)?(?:(?P<user>[^@]+)@)?(?P<host>\[[^\]]+\]|[^:]+)(?::(?P<port>\d+))?$")


@dataclass(frozen=True)
class HostConfig:
    """One host as ssh would reach it: where, as whom, with which keys, checked against which files."""

    name: str
    """The name as asked for (an alias of the config, or a host)."""
    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    """Private key files in the order ssh tries them (``~`` expanded)."""
    known_hosts_files: tuple[str, ...]
    """UserKnownHostsFile then GlobalKnownHostsFile, as ssh reads them."""
    host_key_alias: str | None = None
    proxy_jump: tuple[str, ...] = ()
    """The hops, first to last (``[user@]host[:port]`` each); empty without ProxyJump."""
    proxy_command: str | None = None
    identities_only: bool = False
    use_agent: bool = True
    """False for ``IdentityAgent none`` (whether an agent runs is checked when keys are loaded)."""
    config_file: str | None = None
    """The ``-F`` file this was read from, for the hops (None: the default files)."""

    @property
    def proxied(self) -> bool:
        """True when the connection goes through a ProxyJump or ProxyCommand."""
        return bool(self.proxy_jump) or self.proxy_command is not None

    @property
    def host_key_name(self) -> str:
        """The name the host key is looked up by: HostKeyAlias, else ``host`` or ``[host]:port``."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def read_head(target: SshTarget) -> HostConfig:
    """The head node's config: the supervisor's settings first, then the ssh config files."""
    first: list[tuple[str, str]] = []
    # ssh -p and -i come before -o in our command line (openssh.base_argv), so they win over it.
    if target.port:
        first.append(("Port", str(target.port)))
    if target.identity:
        first.append(("IdentityFile", target.identity))
    first += list(target.options)
    if target.user:
        first.append(("User", target.user))
    return _lookup(target.host, first, target.config_file)


def read_hop(hop: str, config_file: str | None, *, jumps: Sequence[str] | None = None) -> HostConfig:
    """A ProxyJump hop (``[ssh://][user@]host[:port]``) as its own ssh would read it.

    ``jumps``: the hops before this one, which replace its own ProxyJump (ssh
    passes them to the jump's ssh as ``-J``); None keeps its config's.
    """
    m = _HOP.match(hop.strip())
    if m is None:
        raise TunnelError(
            f"cannot read the ProxyJump hop {hop!r}", "write each hop as [user@]host[:port], comma-separated"
        )
    first: list[tuple[str, str]] = []
    if m["user"]:
        first.append(("User", m["user"]))
    if m["port"]:
        first.append(("Port", m["port"]))
    if jumps:
        first.append(("ProxyJump", ",".join(jumps)))
    return _lookup(m["host"].strip("[]"), first, config_file)


def _lookup(host: str, first: Iterable[tuple[str, str]], config_file: str | None) -> HostConfig:
    lines = []
    for key, value in first:
        if "\n" in value or "\n" in key:
            raise TunnelError(f"the ssh option {key} has a line break", "give each option on one line")
        lines.append(f"{key} {value}")
    text = "\n".join([*lines, _config_text(config_file)])
    try:
        options = paramiko.SSHConfig.from_text(text).lookup(host)
    except paramiko.ssh_exception.ConfigParseError as exc:
        raise TunnelError(f"cannot read the ssh config: {exc}", _FIX) from None
    except ImportError:
        raise TunnelError(
            "the ssh config uses 'Match exec', which paramiko runs only with the invoke package",
            "pip install invoke, or use backend='openssh'",
        ) from None
    return _host_config(host, options, config_file)


_FIX = "fix that line of the ssh config, or use backend='openssh'"


def _host_config(host: str, options: Any, config_file: str | None) -> HostConfig:
    try:
        port = int(options.get("port", 22))
    except ValueError:
        raise TunnelError(f"the ssh config gives {host} the port {options['port']!r}", _FIX) from None
    hostname = options["hostname"]
    user = options.get("user") or getpass.getuser()
    identities = options.get("identityfile") or list(DEFAULT_IDENTITIES)
    tokens = {"%d": os.path.expanduser("~"), "%u": getpass.getuser(), "%h": hostname}
    tokens |= {"%p": str(port), "%r": user, "%n": host, "%%": "%"}
    known: list[str] = []
    for key, default in (
        ("userknownhostsfile", DEFAULT_USER_KNOWN_HOSTS),
        ("globalknownhostsfile", DEFAULT_GLOBAL_KNOWN_HOSTS),
    ):
        known += [_expand(p, tokens) for p in shlex.split(options.get(key, default)) if p != "none"]
    jump, command = _proxy(options)
    alias = options.get("hostkeyalias")
    return HostConfig(
        name=host,
        hostname=hostname,
        port=port,
        user=user,
        identity_files=tuple(dict.fromkeys(os.path.expanduser(p) for p in identities)),
        known_hosts_files=tuple(known),
        host_key_alias=alias if alias and alias != "none" else None,
        proxy_jump=jump,
        proxy_command=command,
        identities_only=str(options.get("identitiesonly", "no")).lower() == "yes",
        use_agent=str(options.get("identityagent", "")).lower() != "none",
        config_file=config_file,
    )


def _proxy(options: Any) -> tuple[tuple[str, ...], str | None]:
    """ProxyJump's hops or ProxyCommand's command, whichever ssh obtained first.

    As ssh 9 does: ``ProxyCommand none`` rules out both, ``ProxyJump none``
    only itself (a later ProxyCommand still counts).
    """
    for key in [k for k in options if k in ("proxyjump", "proxycommand")]:
        value = options[key]
        none = value is None or str(value).strip().lower() == "none"
        if key == "proxycommand":
            return (), None if none else str(value)
        if not none:
            return tuple(h.strip() for h in str(value).split(",") if h.strip()), None
    return (), None


def _expand(path: str, tokens: dict[str, str]) -> str:
    out = re.sub(r"%[a-zA-Z%]", lambda m: tokens.get(m.group(0), m.group(0)), path)
    return os.path.expanduser(out)


def _config_text(config_file: str | None) -> str:
    """Every config file ssh reads, in order, with their Includes inlined."""
    home = Path(os.path.expanduser("~/.ssh"))
    if config_file is not None:
        path = Path(os.path.expanduser(config_file))
        try:
            return _inline(path, home, 0)
        except OSError as exc:
            raise TunnelError(
                f"cannot read the ssh config {config_file}: {exc.strerror or exc}",
                "check the ssh_config setting (--ssh-config)",
            ) from None
    parts = []
    for path, base in ((home / "config", home), (Path(SYSTEM_CONFIG), Path(SYSTEM_CONFIG).parent)):
        try:
            parts.append(_inline(path, base, 0))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise TunnelError(f"cannot read the ssh config {path}: {exc.strerror or exc}", _FIX) from None
        # The next file starts outside any Host block of this one.
        parts.append("Host *")
    return "\n".join(parts)


def _inline(path: Path, base: Path, depth: int, scope: list[str] | None = None) -> str:
    """``path``'s text with each ``Include`` replaced by the files it names (SSHConfig ignores them).

    Relative names are under ``base`` (``~/.ssh`` for the user's files,
    ``/etc/ssh`` for the system's), globs expand in name order, missing files
    are skipped, as in ssh. An Include inside a Host or Match block applies
    only where that block does: the included blocks become ``Match`` lines
    that carry the outer block's conditions (``scope``) too. After the
    included text the block that held the Include is opened again.
    """
    if depth > _MAX_DEPTH:
        raise TunnelError(f"the ssh config includes too deeply at {path}", "look for an Include loop")
    lines: list[str] = []
    block, inner = ("Host *", None) if scope is None else (f"Match {shlex.join(scope)}", scope)
    for raw in path.read_text(errors="replace").splitlines():
        m = _KEY.match(raw)
        key = m.group(1).lower() if m else ""
        if m is None or key not in ("host", "match", "include"):
            lines.append(raw)
            continue
        if key != "include":
            block, inner = _block(key, m.group(2), scope)
            lines.append(block)
            continue
        for pattern in shlex.split(m.group(2)):
            name = os.path.expanduser(pattern)
            full = name if os.path.isabs(name) else str(base / name)
            for found in sorted(glob.glob(full)):
                lines.append(_inline(Path(found), base, depth + 1, inner))
        lines.append(block)
    return "\n".join(lines)


def _block(key: str, value: str, scope: list[str] | None) -> tuple[str, list[str] | None]:
    """A Host or Match line under ``scope``: the line to write, and the scope it makes for an Include."""
    words = shlex.split(value)
    if key == "host":
        if words == ["*"]:
            return (f"Host {value}", None) if scope is None else (f"Match {shlex.join(scope)}", scope)
        conditions = ["originalhost", ",".join(words)]
    elif words == ["all"]:
        return (f"Match {value}", None) if scope is None else (f"Match {shlex.join(scope)}", scope)
    else:
        conditions = words
    if scope is None:
        return (f"Host {value}" if key == "host" else f"Match {value}"), conditions
    both = [*scope, *conditions]
    return f"Match {shlex.join(both)}", both

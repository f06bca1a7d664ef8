"""Host keys and identities for the paramiko transport, read as ssh reads them.

ssh's own files decide: the known_hosts files and ``HostKeyAlias`` that
``ssh -G`` names, with plain, hashed, wildcard and negated entries; and every
``IdentityFile`` it lists. A host key is never added to known_hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import paramiko

from .openssh import SshConfig, base_argv
from .target import SshTarget

_SSH_KEY_NAMES = {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA", "ssh-dss": "DSA"}


# -- known_hosts -----------------------------------------------------------------


def host_key_name(config: SshConfig) -> str:
    """The name ssh looks the host key up by: HostKeyAlias, else ``host`` or ``[host]:port``."""
    alias = config.options.get("hostkeyalias", "none")
    if alias not in ("", "none"):
        return alias
    return config.hostname if config.port == 22 else f"[{config.hostname}]:{config.port}"


def known_hosts_files(config: SshConfig) -> list[str]:
    """The known_hosts files ssh reads for this destination, user's first."""
    files: list[str] = []
    for option in ("userknownhostsfile", "globalknownhostsfile"):
        files += [os.path.expanduser(p) for p in config.options.get(option, "").split() if p != "none"]
    return files


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        return bool(paramiko.HostKeys.hash_host(name, pattern) == pattern)
    # Only * and ? are wildcards; the brackets of [host]:port are literal.
    regex = re.escape(pattern.lower()).replace(r"\*", ".*").replace(r"\?", ".")
    return re.fullmatch(regex, name.lower()) is not None


def _entry_matches(patterns: Iterable[str], name: str) -> bool:
    matched = False
    for pattern in patterns:
        if pattern.startswith("!"):
            if _pattern_matches(pattern[1:], name):
                return False
        elif _pattern_matches(pattern, name):
            matched = True
    return matched


def host_keys(files: Iterable[str], name: str) -> tuple[dict[str, list[Any]], list[Any]]:
    """The keys known for ``name`` in ``files`` by key type, and those marked ``@revoked``, in one reading.

    Lines ssh would skip are skipped: comments, malformed keys, unknown key
    types, and ``@cert-authority`` lines (host certificates are not supported
    here). A ``@revoked`` key is never accepted, even where also listed as known.
    """
    known: dict[str, list[Any]] = {}
    revoked: list[Any] = []
    for path in files:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            marker = None
            if line.startswith("@"):
                marker, _, line = line.partition(" ")
                if marker != "@revoked":
                    continue
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line.strip())
            except (paramiko.hostkeys.InvalidHostKey, paramiko.SSHException, ValueError):
                continue
            if entry is None or entry.key is None or not _entry_matches(entry.hostnames, name):
                continue
            if marker is None:
                known.setdefault(entry.key.get_name(), []).append(entry.key)
            else:
                revoked.append(entry.key)
    return known, revoked


def known_host_keys(files: Iterable[str], name: str) -> dict[str, list[Any]]:
    """The keys known for ``name`` in ``files``, by key type (plain, hashed and wildcard entries)."""
    return host_keys(files, name)[0]


class RevokedHostKey(Exception):
    """The server's host key is marked ``@revoked`` in known_hosts."""


def _key_label(key: Any) -> str:
    kind = str(key.get_name())
    return "ECDSA" if kind.startswith("ecdsa-") else _SSH_KEY_NAMES.get(kind, kind)


class UnknownHostKey(Exception):
    """No known_hosts file has a key of the server's type for this host; it is never added."""


def check_host_key(
    server_key: Any, known: dict[str, list[Any]], name: str, revoked: Iterable[Any] = ()
) -> None:
    """Return when ``server_key`` is known for ``name`` and not revoked.

    Raises :class:`RevokedHostKey` for a key marked ``@revoked`` (as ssh does,
    whatever else lists it), :class:`UnknownHostKey` when no key of its type is
    known, and paramiko's ``BadHostKeyException`` when the known one differs.
    """
    if any(k.asbytes() == server_key.asbytes() for k in revoked):
        raise RevokedHostKey(f"The {_key_label(server_key)} host key for {name} is marked as revoked.")
    kind = server_key.get_name()
    if kind not in known:
        raise UnknownHostKey(
            f"No {_key_label(server_key)} host key is known for {name}.\nHost key verification failed."
        )
    if any(k.asbytes() == server_key.asbytes() for k in known[kind]):
        return
    raise paramiko.BadHostKeyException(name, server_key, known[kind][0])


def key_type_of(algorithm: str) -> str:
    """The key type a host key algorithm uses (``rsa-sha2-512`` is an ``ssh-rsa`` key)."""
    return "ssh-rsa" if algorithm in ("rsa-sha2-512", "rsa-sha2-256") else algorithm


# -- identities ----------------------------------------------------------------------


async def identity_files(target: SshTarget, config: SshConfig) -> list[str]:
    """Every IdentityFile ``ssh -G`` lists (``SshConfig`` keeps only the first), ``--identity`` first."""
    files: list[str] = []
    with contextlib.suppress(OSError):  # no ssh binary: the identities already known will do
        proc = await asyncio.create_subprocess_exec(
            *base_argv(target),
            "-G",
            target.destination,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            out, _ = await proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        files = [
            line.split(" ", 1)[1].strip()
            for line in out.decode(errors="replace").splitlines()
            if line.startswith("identityfile ")
        ]
    first = [target.identity] if target.identity else []
    chosen = config.options.get("identityfile")
    return list(dict.fromkeys(os.path.expanduser(p) for p in [*first, *([chosen] if chosen else []), *files]))


def load_keys(paths: Iterable[str], notes: list[str]) -> Iterator[tuple[str, Any]]:
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            yield path, paramiko.PKey.from_path(path)
        except paramiko.PasswordRequiredException:
            notes.append(f"skipped {path}: it needs a passphrase (load it into ssh-agent)")
        except (paramiko.SSHException, OSError, ValueError) as exc:
            notes.append(f"skipped {path}: {exc}")

"""Host keys and identities for the paramiko transport, read as ssh reads them.

The known_hosts files and ``HostKeyAlias`` come from the user's ssh config
(:mod:`wqsupervisor.paramiko_config`); entries are plain, hashed (``|1|``),
``[host]:port``, wildcard and negated, with the ``@revoked`` and
``@cert-authority`` markers. Lines are parsed with paramiko's
``HostKeyEntry.from_line`` and hashed names checked with
``HostKeys.hash_host``, but not loaded with ``HostKeys.load``: it raises on
a marker line (``@revoked host ssh-ed25519 ...`` is read as a host named
``@revoked`` with key data ``ssh-ed25519``), matches neither wildcards nor
negations, and keeps one key per type and name. A host key is never added.

Host certificates are not supported: paramiko accepts a certificate's key
without checking the CA's signature, the principals or the validity (its
``Transport`` only parses the certificate), so this module never lets a
``@cert-authority`` line vouch for a host; a host known only through one is
refused with :class:`HostCertificateUnsupported`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

_SSH_KEY_NAMES = {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA", "ssh-dss": "DSA"}


# -- known_hosts -----------------------------------------------------------------


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


class RevokedHostKey(Exception):
    """The server's host key is marked ``@revoked`` in known_hosts."""


class UnknownHostKey(Exception):
    """No known_hosts file has a key of the server's type for this host; it is never added."""


class HostCertificateUnsupported(Exception):
    """The host is known only through a ``@cert-authority`` line, which this transport cannot check."""


def _key_label(key: Any) -> str:
    kind = str(key.get_name())
    return "ECDSA" if kind.startswith("ecdsa-") else _SSH_KEY_NAMES.get(kind, kind)


@dataclass(frozen=True)
class KnownHosts:
    """What the known_hosts files say of one host name: its keys by type, revoked keys, CA keys."""

    name: str
    keys: dict[str, list[Any]] = field(default_factory=dict)
    revoked: list[Any] = field(default_factory=list)
    authorities: list[Any] = field(default_factory=list)
    """Keys of ``@cert-authority`` lines for this name (never trusted here, see the module)."""

    @classmethod
    def read(cls, files: Iterable[str], name: str) -> KnownHosts:
        """Every line of ``files`` for ``name``, in one reading; lines ssh would skip are skipped.

        Comments, malformed keys, unknown key types and unknown markers are
        skipped, as ssh does; a missing file is no error.
        """
        found = cls(name)
        for path in files:
            try:
                text = Path(path).read_text(errors="replace")
            except OSError:
                continue
            for raw in text.splitlines():
                found._add(raw.strip())
        return found

    def _add(self, line: str) -> None:
        if not line or line.startswith("#"):
            return
        marker = None
        if line.startswith("@"):
            marker, _, line = line.partition(" ")
            if marker not in ("@revoked", "@cert-authority"):
                return
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line.strip())
        except (paramiko.hostkeys.InvalidHostKey, paramiko.SSHException, ValueError):
            return
        if entry is None or entry.key is None or not _entry_matches(entry.hostnames, self.name):
            return
        if marker is None:
            self.keys.setdefault(entry.key.get_name(), []).append(entry.key)
        elif marker == "@revoked":
            self.revoked.append(entry.key)
        else:
            self.authorities.append(entry.key)

    def check(self, server_key: Any) -> None:
        """Return when ``server_key`` is known for the name and not revoked.

        Raises :class:`RevokedHostKey` for a key marked ``@revoked`` (as ssh
        does, whatever else lists it), :class:`HostCertificateUnsupported`
        when the key is not known but a ``@cert-authority`` line names the
        host, :class:`UnknownHostKey` when no key of its type is known, and
        paramiko's ``BadHostKeyException`` when the known one differs.
        """
        blob = server_key.asbytes()
        if any(k.asbytes() == blob for k in self.revoked):
            raise RevokedHostKey(
                f"The {_key_label(server_key)} host key for {self.name} is marked as revoked."
            )
        kind = server_key.get_name()
        if any(k.asbytes() == blob for k in self.keys.get(kind, ())):
            return
        if self.authorities:
            raise HostCertificateUnsupported(
                f"{self.name} is known only through a @cert-authority line in known_hosts: host certificates "
                "are not supported by the paramiko backend"
            )
        if kind not in self.keys:
            label = _key_label(server_key)
            raise UnknownHostKey(
                f"No {label} host key is known for {self.name}.\nHost key verification failed."
            )
        raise paramiko.BadHostKeyException(self.name, server_key, self.keys[kind][0])


def known_host_keys(files: Iterable[str], name: str) -> dict[str, list[Any]]:
    """The keys known for ``name`` in ``files``, by key type (plain, hashed and wildcard entries)."""
    return KnownHosts.read(files, name).keys


def key_type_of(algorithm: str) -> str:
    """The key type a host key algorithm uses (``rsa-sha2-512`` is an ``ssh-rsa`` key)."""
    return "ssh-rsa" if algorithm in ("rsa-sha2-512", "rsa-sha2-256") else algorithm


# -- identities ----------------------------------------------------------------------


def load_keys(paths: Iterable[str], notes: list[str]) -> Iterator[tuple[str, Any]]:
    """The private keys of ``paths`` that exist and load (without a passphrase), labelled by path.

    Those that do not load are skipped with a note for the user.
    """
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            yield path, paramiko.PKey.from_path(path)
        except paramiko.PasswordRequiredException:
            notes.append(f"skipped {path}: it needs a passphrase (load it into ssh-agent)")
        except (paramiko.SSHException, OSError, ValueError) as exc:
            notes.append(f"skipped {path}: {exc}")

"""The SSH target: where the head node is and how to reach it, as one value.

Every transport (the OpenSSH client, paramiko), every head-node command and
every batch runner needs the same few facts about the head node; they take an
:class:`SshTarget` instead of the whole :class:`~wqsupervisor.config.Settings`.
It is built once, by :meth:`Settings.ssh_target`, and imports nothing of the
package, so any layer can use it without pulling in the others.
"""

from __future__ import annotations

from dataclasses import dataclass

LOOPBACK_BINDS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class SshTarget:
    """A head node and the ssh settings that reach it."""

    destination: str
    """The head node as given (``host`` or ``user@host``, or a ``Host`` alias of the ssh config)."""
    port: int | None = None
    """sshd's port; None leaves it to the ssh config (22 by default)."""
    identity: str | None = None
    """A private key file (``ssh -i``)."""
    options: tuple[tuple[str, str], ...] = ()
    """``-o KEY=VALUE`` options, in the user's order; they win over the supervisor's defaults."""
    config_file: str | None = None
    """An ssh config file to read instead of ``~/.ssh/config`` (``ssh -F``)."""
    connect_timeout: float = 15.0
    """Seconds to wait for a connection and its authentication."""
    bind: str = "127.0.0.1"
    """Where the head node binds the remote port (``GatewayPorts`` permitting)."""
    program: str = "ssh"
    """The OpenSSH client to run, for the backends and commands that run one."""
    keepalive: float = 5.0
    """Seconds between pings through a tunnel's session (its lease on the head is renewed as often)."""

    @property
    def host(self) -> str:
        """The host part of :attr:`destination`."""
        return self.destination.rpartition("@")[2]

    @property
    def user(self) -> str | None:
        """The user part of :attr:`destination`, or None when the ssh config decides."""
        user, at, _ = self.destination.rpartition("@")
        return user if at else None

    @property
    def bind_is_loopback(self) -> bool:
        """True when only the head node itself can reach the remote port."""
        return self.bind in LOOPBACK_BINDS

    def option(self, key: str) -> str | None:
        """The user's value for an ssh option (case-insensitive, first one wins, as ssh does)."""
        for k, value in self.options:
            if k.lower() == key.lower():
                return value
        return None

    def __str__(self) -> str:
        return self.destination if self.port is None else f"{self.destination}:{self.port}"

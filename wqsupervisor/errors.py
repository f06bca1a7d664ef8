"""Exceptions raised by wqsupervisor.

Every error meant for a person carries a ``hint``: what to do about it.
"""

from __future__ import annotations


class WQSupervisorError(Exception):
    """Base class of every error wqsupervisor raises on purpose."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}; {self.hint}"
        return self.message


class ConfigError(WQSupervisorError):
    """A setting is missing, malformed or contradicts another one."""


class IllegalTransition(WQSupervisorError):
    """A lifecycle was asked to move between two states that are not connected."""

    def __init__(self, kind: str, current: str, wanted: str) -> None:
        super().__init__(f"{kind} cannot go from {current!r} to {wanted!r}")
        self.current = current
        self.wanted = wanted


class TunnelError(WQSupervisorError):
    """The tunnel hit a failure that retrying will not fix (bad key, host key, port taken)."""


class MasterError(WQSupervisorError):
    """The master did not meet the contract the supervisor relies on."""


class ProtocolError(WQSupervisorError):
    """A peer spoke something other than the Work Queue status or RPC protocol."""


class AuthenticationFailed(WQSupervisorError):
    """The Work Queue password handshake was refused by the peer."""

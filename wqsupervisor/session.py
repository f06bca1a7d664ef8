"""The session interface: what the tunnel needs from any transport, and nothing more.

A *session* is one connection to the head node that carries the reverse
forward (head's ``REMOTE`` -> this master), a remote command that greets and
echoes (:data:`REMOTE_COMMAND`), and probe connections into the head's
``127.0.0.1:REMOTE``. A :class:`SessionFactory` starts sessions for one
tunnel. The OpenSSH client (:mod:`wqsupervisor.openssh`) and paramiko
(:mod:`wqsupervisor.paramiko_backend`) implement both; a new transport is one
new module that does the same, and :func:`wqsupervisor.backends.sessions_for`
names it.

Failures are typed: each implementation turns its own evidence (ssh's stderr,
paramiko's exceptions) into a :class:`SessionFailure` of a :class:`FailureKind`.
The words shown to the user are made here, once, for every transport.

This module imports nothing heavy, so the tunnel, the forward check and the
tests can name the interface without loading a transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import shlex
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .errors import TunnelError
from .process import pid_alive

if TYPE_CHECKING:
    from .protocol.snapshot import RelaySnapshot

# The remote side of every session: it names the head's sshd session ($PPID,
# the process to end if the session outlives its client) and echoes our pings
# through the very connection that carries the forward. cat ends with the
# session, so nothing is left running on the head node.
REMOTE_COMMAND = "exec sh -c 'echo wqs-session $PPID; exec cat'"
# Where a tunnel's session keeps its lease on the head node: one file per sshd session pid.
LEASE_DIR = ".wqsupervisor/sessions"
_STARTED = int(time.time())


@dataclass(frozen=True)
class Owner:
    """The supervisor a session serves, as the session names it on the head: ``host pid since keepalive``."""

    host: str
    pid: int
    since: int
    keepalive: float

    @classmethod
    def here(cls, keepalive: float) -> Owner:
        """This supervisor (this process on this machine)."""
        return cls(socket.gethostname(), os.getpid(), _STARTED, keepalive)

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        """From :meth:`words` (None when the text is not that)."""
        parts = text.split()
        try:
            return cls(parts[0], int(parts[1]), int(parts[2]), float(parts[3]))
        except (IndexError, ValueError):
            return None

    def words(self) -> str:
        """``host pid since keepalive``, as the head's leases and the relay's HELLO carry it."""
        return f"{self.host} {self.pid} {self.since} {self.keepalive:g}"

    def is_here(self) -> bool:
        """This owner is this supervisor."""
        return self.host == socket.gethostname() and self.pid == os.getpid()

    def gone(self) -> bool:
        """A supervisor of this host whose process has ended (one elsewhere cannot be told)."""
        return self.host == socket.gethostname() and not pid_alive(self.pid)

    @property
    def grace(self) -> float:
        """Seconds of silence after which the supervisor counts as gone: three pings and a little."""
        return 3 * self.keepalive + 5

    def expired(self, silent_for: float) -> bool:
        """Silent longer than :attr:`grace`: the supervisor is gone or cut off."""
        return silent_for > self.grace

    def describe(self) -> str:
        """``host H, pid N, since T``."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"host {self.host}, pid {self.pid}, since {since}"


def lease_command(keepalive: float, port: int = 0) -> str:
    """The remote command of a session that forwards the port: as :data:`REMOTE_COMMAND`, with a lease.

    The lease, ``~/.wqsupervisor/sessions/<sshd pid>`` (0700 directory), says
    which supervisor the session serves (campus host, pid, since when, ping
    interval) and the remote ``port`` it forwards (0: not known yet); it is
    rewritten at every ping, before the answer, and removed when the session
    ends. Another supervisor that finds the port held reads it: a fresh lease
    is a live tunnel of someone else's, never a stale session to end. The port
    is how it finds the lease at all where sshd hides its sessions' sockets
    from their own user (an unprivileged account on OpenSSH, which makes
    session processes non-dumpable).
    """
    owner = f"{Owner.here(keepalive).words()} {port}"
    inner = (
        # A parent already gone (reparented to init): the session is over before it began.
        '[ "$PPID" != 1 ] || exit 0; '
        f'umask 077; d="$HOME/{LEASE_DIR}"; mkdir -p "$d" 2>/dev/null; f="$d/$PPID"; '
        # Leases of sessions that died without removing theirs (killed outright) go first.
        'for x in "$d"/*; do [ -e "$x" ] && [ ! -d "/proc/${x##*/}" ] && rm -f "$x"; done; '
        f"o={shlex.quote(owner)}; "
        'printf "%s\\n" "$o" > "$f" 2>/dev/null; echo wqs-session $PPID; '
        'while IFS= read -r l; do printf "%s\\n" "$o" > "$f" 2>/dev/null; printf "%s\\n" "$l"; done; '
        'rm -f "$f"'
    )
    return f"exec sh -c {shlex.quote(inner)}"


# Measured faster than the defaults of both clients (AEAD in one pass).
FAST_CIPHER = "aes128-gcm@openssh.com"


class FailureKind(enum.StrEnum):
    """Why a session could not start, or ended."""

    PORT_TAKEN = "port_taken"
    PORT_OWNED = "port_owned"
    """Another supervisor's live session (its lease renewed) or relay holds the port."""
    HOST_KEY_CHANGED = "host_key_changed"
    HOST_KEY_UNKNOWN = "host_key_unknown"
    AUTH = "auth"
    RESOLVE = "unknown_host"
    CONFIG = "config"
    REFUSED = "refused"
    NETWORK = "network"
    EXITED = "exited"


@dataclass(frozen=True)
class SessionFailure:
    """How a session failed, for the user: ``permanent`` ones are not retried.

    Build them with the constructors below, which word each kind the same way
    whatever the transport; ``detail`` is the transport's own last word.
    """

    kind: FailureKind
    message: str
    hint: str
    permanent: bool
    port: int | None = None
    waits: bool = False
    """It clears by itself in a bounded time: retried without counting against the start attempts."""

    @classmethod
    def port_taken(cls, dest: str, port: int) -> SessionFailure:
        """The head node refused to bind the remote port."""
        return cls(
            FailureKind.PORT_TAKEN,
            f"the head node refused remote port {port}: it is already bound there",
            f"pick another --remote-port, or free port {port} on {dest}",
            permanent=True,
            port=port,
        )

    @classmethod
    def port_owned(cls, where: str, by: str, owner: str) -> SessionFailure:
        """``where`` is held by another live supervisor's ``by`` (tunnel, relay), described as ``owner``."""
        return cls(
            FailureKind.PORT_OWNED,
            f"{where} is held by another wqsupervisor's {by} ({owner})",
            "give each master its own --remote-port, or stop that supervisor",
            permanent=True,
        )

    @classmethod
    def owner_gone(cls, where: str, owner: Owner) -> SessionFailure:
        """``where`` still serves a supervisor of this host that is gone; it takes another once that
        one has been silent for its :attr:`Owner.grace`, so this is retried (``waits``)."""
        return cls(
            FailureKind.PORT_OWNED,
            f"{where} still serves a wqsupervisor that is gone ({owner.describe()})",
            f"it takes this one once that one's session has been silent for {owner.grace:g} s",
            permanent=False,
            waits=True,
        )

    @classmethod
    def host_key_revoked(cls, dest: str) -> SessionFailure:
        """known_hosts marks the head's host key ``@revoked``."""
        return cls(
            FailureKind.HOST_KEY_CHANGED,
            f"the host key of {dest} is marked @revoked in known_hosts",
            "do not connect; ask the head node's admins for its current key",
            permanent=True,
        )

    @classmethod
    def host_key_changed(cls, dest: str) -> SessionFailure:
        """The head's host key differs from the known one."""
        return cls(
            FailureKind.HOST_KEY_CHANGED,
            f"the host key of {dest} does not match known_hosts",
            "if the head node was reinstalled, check the new key with its admins and update "
            "known_hosts (ssh-keygen -R HOST); otherwise do not connect",
            permanent=True,
        )

    @classmethod
    def host_key_unknown(cls, dest: str) -> SessionFailure:
        """No known_hosts file knows the head's host key, and nobody may be asked."""
        return cls(
            FailureKind.HOST_KEY_UNKNOWN,
            f"the host key of {dest} is not in known_hosts and ssh runs in batch mode",
            f"{_by_hand(dest)} and accept the key after checking it",
            permanent=True,
        )

    @classmethod
    def auth(cls, dest: str, detail: str) -> SessionFailure:
        """The head node accepted none of our keys."""
        return cls(
            FailureKind.AUTH,
            f"ssh to {dest} failed: {detail}",
            f"check --identity or IdentityFile, or {_by_hand(dest)}",
            permanent=True,
        )

    @classmethod
    def unresolved(cls, dest: str, detail: str) -> SessionFailure:
        """The head's name does not resolve (final unless the tunnel was up before, see :meth:`once_up`)."""
        return cls(
            FailureKind.RESOLVE,
            f"ssh cannot resolve {dest}: {detail}",
            "check --via, or add the host to ~/.ssh/config",
            permanent=True,
        )

    @classmethod
    def config(cls, detail: str) -> SessionFailure:
        """The transport rejected its options."""
        return cls(
            FailureKind.CONFIG,
            f"ssh rejected its options: {detail}",
            "check --ssh-option and --config values",
            permanent=True,
        )

    @classmethod
    def refused(cls, dest: str, detail: str) -> SessionFailure:
        """Nothing accepts connections at the head's sshd port."""
        return cls(
            FailureKind.REFUSED,
            f"nothing accepts ssh connections at {dest}: {detail}",
            "check --via and --ssh-port, and that sshd runs on the head node",
            permanent=False,
        )

    @classmethod
    def network(cls, dest: str, detail: str) -> SessionFailure:
        """The connection failed or was lost on the way."""
        return cls(
            FailureKind.NETWORK, f"the connection to {dest} failed: {detail}", "retrying", permanent=False
        )

    @classmethod
    def exited(cls, code: int | None, detail: str = "") -> SessionFailure:
        """The session ended for a reason no other kind names."""
        if detail and code is not None and code > 0:
            message = f"ssh exited with status {code}: {detail}"
        else:
            message = f"ssh ended ({describe_exit(code)})"
        return cls(FailureKind.EXITED, message, "restarting", permanent=False)

    def once_up(self) -> SessionFailure:
        """This failure as seen by a tunnel that has been up before.

        After a network change name lookups fail for a while, and a remote port
        that was ours may be taken by another program for a while (our session
        died, something bound the port meanwhile): only a tunnel that never
        came up takes an unresolved name or a taken port as final. Retried
        with backoff, each attempt says who holds the port.
        """
        if self.kind in (FailureKind.RESOLVE, FailureKind.PORT_TAKEN, FailureKind.PORT_OWNED):
            return replace(self, permanent=False)
        return self

    def as_error(self) -> TunnelError:
        """This failure as an exception for callers that raise."""
        return TunnelError(self.message, self.hint)


def _by_hand(dest: str) -> str:
    return f"run 'ssh {dest}' once by hand to see what it asks"


def describe_exit(code: int | None) -> str:
    """An exit code in words: ``status 1``, ``killed by SIGKILL``, ``still running``."""
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"status {code}"


class SessionEnded(Exception):
    """The session ended while something waited on it; ``exit_code`` says how."""

    def __init__(self, exit_code: int | None) -> None:
        super().__init__(f"the session ended ({describe_exit(exit_code)})")
        self.exit_code = exit_code


class SessionFailed(Exception):
    """A session could not even be started; ``failure`` says why."""

    def __init__(self, failure: SessionFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


@runtime_checkable
class Session(Protocol):
    """One running connection to the head node, as the tunnel sees it."""

    @property
    def pid(self) -> int | None:
        """The local process that runs the session, None when it lives in this process."""
        ...

    @property
    def remote_pid(self) -> int | None:
        """The head's sshd process of this session, once it has greeted us."""
        ...

    @property
    def allocated_port(self) -> int | None:
        """The port the head node chose when asked for remote port 0, once known."""
        ...

    @property
    def sock(self) -> socket.socket | None:
        """The TCP connection when this process owns it (TCP_INFO, the retransmission cap)."""
        ...

    @property
    def running(self) -> bool:
        """True until the session has ended."""
        ...

    async def established(self) -> None:
        """Wait until the remote command runs; raises :class:`SessionEnded` if the session ends first."""
        ...

    async def exited(self) -> int:
        """Wait for the session to end; returns its exit code (ssh's conventions)."""
        ...

    def failure(self) -> SessionFailure:
        """How the session ended, classified (ask once :meth:`exited` returned)."""
        ...

    async def ping(self) -> float:
        """One round trip through the session; returns its seconds (wrap it in a timeout)."""
        ...

    async def open_probe(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection into the head node's ``127.0.0.1:REMOTE`` through this session."""
        ...

    async def close(self) -> int | None:
        """End the session and wait until all of it is gone; returns the exit code."""
        ...

    def kill_now(self) -> None:
        """End the session without waiting (the supervisor itself is dying)."""
        ...


@runtime_checkable
class Detachable(Protocol):
    """A session whose forward outlives it (resumable forwarding): restarts let go, close() ends all."""

    @property
    def resumed(self) -> bool | None:
        """True when this session took over connections held for it; None until it knows."""
        ...

    async def detach(self) -> int | None:
        """End this session but leave what holds the workers' connections for the next session."""
        ...


@runtime_checkable
class Resumable(Protocol):
    """A session factory that runs a head relay (resumable forwarding)."""

    @property
    def off(self) -> str | None:
        """Why resumption is off (None: on, or not decided yet)."""
        ...

    def relay_snapshot(self) -> RelaySnapshot | None:
        """The relay's figures, None before its first session."""
        ...

    @property
    def holds_relay(self) -> bool:
        """True when a relay of ours may be waiting on the head (started, not known to have ended)."""
        ...

    @property
    def linger(self) -> float:
        """How long the head relay waits for a session before it ends itself."""
        ...

    async def let_go(self) -> None:
        """Close the master connections kept for the relay's workers; the relay is left waiting."""
        ...

    async def end_relay(self) -> bool:
        """End the head relay now, through a session of its own if none is up (best effort, bounded);
        True when no relay of ours is left on the head."""
        ...


@dataclass(frozen=True)
class HeadAddress:
    """Where a fresh TCP connection reaches the head's sshd (to ask whether it answers)."""

    host: str
    port: int


@dataclass(frozen=True)
class HeadRun:
    """How a one-off command on the head node went: its status (None: it did not end), its output."""

    status: int | None
    out: str = ""
    err: str = ""


@runtime_checkable
class SessionFactory(Protocol):
    """Starts the sessions of one tunnel; a transport's one entry point."""

    name: str
    """The transport's name, as ``Settings.backend`` spells it."""

    async def prepare(self, rundir: str, tag: str) -> None:
        """Read what every session needs (the ssh config...); raises :class:`TunnelError` when it cannot.

        ``rundir`` is a private directory for sockets; ``tag`` tells this
        tunnel's files apart from another's.
        """
        ...

    @property
    def owns_socket(self) -> bool:
        """True when this process opens the TCP connection (after :meth:`prepare`)."""
        ...

    @property
    def head(self) -> HeadAddress | None:
        """The head's sshd for a direct look, None when it is reached through a proxy."""
        ...

    async def start(self, *, master_port: int | None, remote_port: int, probes: str | None) -> Session:
        """Start a session; raises :class:`SessionFailed` when none could be.

        ``master_port`` None makes a session without the reverse forward (for
        probes only); ``remote_port`` 0 lets the head node choose; ``probes``
        names the probe endpoint, None when no probe will be opened.
        """
        ...

    async def run_on_head(
        self, command: str, stdin: bytes = b"", timeout: float = 10.0, *, fresh: bool = False
    ) -> HeadRun:
        """Run ``command`` on the head node (the port's holders, ending a stale session, ``true``).

        Never raises for a head that cannot be reached or a command that
        overruns ``timeout``: the status is None then. ``fresh``: on a
        connection of its own, to learn whether the head answers one now.
        """
        ...


class RemoteLines:
    """The remote command's side of a session: its greeting, and the pings it echoes.

    A transport feeds every line the remote command prints to :meth:`feed`,
    sends pings with :meth:`ping`, and calls :meth:`ended` when the session is
    gone. Must be used from the event loop's thread.
    """

    def __init__(self) -> None:
        self.remote_pid: int | None = None
        self._loop = asyncio.get_running_loop()
        self.greeted: asyncio.Future[None] = self._loop.create_future()
        # Nobody may be waiting when the session dies first; the exit is reported elsewhere.
        self.greeted.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pongs: dict[int, asyncio.Future[None]] = {}
        self._seq = 0

    def feed(self, line: str) -> None:
        """Read one line: ``wqs-session PID`` greets, ``wqs-ping N`` answers ping N."""
        words = line.split()
        if len(words) != 2 or not words[1].isdigit():
            return
        if words[0] == "wqs-session":
            self.remote_pid = int(words[1])
            if not self.greeted.done():
                self.greeted.set_result(None)
        elif words[0] == "wqs-ping":
            fut = self._pongs.get(int(words[1]))
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def ping(self, send: Callable[[bytes], Awaitable[None]]) -> float:
        """Send one ping line with ``send`` and wait for its echo; returns the seconds it took."""
        self._seq += 1
        seq = self._seq
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pongs[seq] = fut
        sent = self._loop.time()
        try:
            await send(f"wqs-ping {seq}\n".encode())
            await fut
            return self._loop.time() - sent
        finally:
            self._pongs.pop(seq, None)

    def ended(self, exit_code: int | None) -> None:
        """The session is gone: whoever waits for a greeting or a pong gets :class:`SessionEnded`."""
        for fut in self._pongs.values():
            if not fut.done():
                fut.set_exception(SessionEnded(exit_code))
        if not self.greeted.done():
            self.greeted.set_exception(SessionEnded(exit_code))

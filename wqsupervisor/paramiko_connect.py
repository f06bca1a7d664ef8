"""An authenticated paramiko connection to one host, by the route its ssh config gives.

:class:`Dialer` opens :class:`Connection` objects; it blocks, so it runs in a
thread, and :meth:`Dialer.stop` (from any thread) ends everything it started.
The route is the config's (:mod:`wqsupervisor.paramiko_config`):

* direct: a TCP connection (the session opens its own beforehand and hands it in);
* ``ProxyJump a,b``: a connection to ``b`` (itself made through ``a``, with
  ``b``'s own config entry, host key check and keys), then a ``direct-tcpip``
  channel from ``b`` to the host, which is the socket of the host's Transport;
* ``ProxyCommand``: ``paramiko.ProxyCommand``, run by ``/bin/sh -c`` as ssh
  runs it with the user's shell (paramiko alone splits the command into words,
  without pipes or redirections), and owned: it dies with this process.

Every hop's host key is checked (:class:`~wqsupervisor.sshkeys.KnownHosts`) and
never added; every hop authenticates with its own keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass, field
from typing import Any

import paramiko

from . import tcpconn
from .errors import TunnelError
from .paramiko_config import HostConfig, read_hop
from .process import owned_argv
from .session import FAST_CIPHER, FailureKind, HeadRun, SessionFailure
from .sshkeys import (
    HostCertificateUnsupported,
    KnownHosts,
    RevokedHostKey,
    UnknownHostKey,
    key_type_of,
    load_keys,
)

LOGGER_NAME = "wqsupervisor.paramiko"
# paramiko's transport logs every dropped connection at ERROR; it goes to
# the application's logging if it has any, and nowhere otherwise.
logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())
_JOIN_TIMEOUT = 5.0
_MAX_HOPS = 8


class PublicKeyRefused(Exception):
    """The host accepted none of the keys offered."""


class JumpFailed(Exception):
    """A ProxyJump hop could not be reached, or could not reach the next host; ``cause`` says why."""

    def __init__(self, hop: HostConfig, cause: BaseException) -> None:
        super().__init__(f"ProxyJump {hop.name}: {cause}")
        self.hop = hop
        self.cause = cause


@dataclass
class Connection:
    """An authenticated Transport and the hops' connections under it (their sockets are the Dialer's)."""

    transport: Any
    config: HostConfig
    jumps: list[Connection] = field(default_factory=list)

    def close(self) -> None:
        """Close the transport, then every hop under it, and wait for their threads (bounded)."""
        for conn in [self, *self.jumps]:
            conn.transport.close()
            if conn.transport.is_alive():
                conn.transport.join(_JOIN_TIMEOUT)


def _end_handshake_timer(transport: Any) -> None:
    """Stop the timer paramiko keeps for a handshake that never completed.

    paramiko starts a (non-daemon) ``threading.Timer`` when a handshake begins
    and cancels it only when the handshake completes, so a transport that
    died or was closed in its handshake leaves that thread for the whole
    handshake timeout (seen as a thread left after a close while connecting).
    """
    packetizer = transport.packetizer
    packetizer.complete_handshake()  # cancels the timer, if any
    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer) and thread.function == packetizer.read_timer:
            thread.join(_JOIN_TIMEOUT)


class Dialer:
    """Opens connections for one user of them; :meth:`stop` from any thread ends every one it started.

    ``adopt`` is told of every Transport (a thread) as it is made, ``notes``
    gets lines for the user (keys skipped), and ``fast_cipher`` puts
    :data:`~wqsupervisor.session.FAST_CIPHER` first.
    """

    def __init__(
        self,
        timeout: float,
        *,
        notes: MutableSequence[str],
        fast_cipher: bool = True,
        adopt: Callable[[Any], None] | None = None,
    ) -> None:
        self.timeout = timeout
        self._notes = notes
        self._fast_cipher = fast_cipher
        self._adopt = adopt
        self._lock = threading.Lock()
        self._parts: list[Any] = []
        self._stopped = False

    def stop(self) -> None:
        """End every socket, proxy command and transport started, and refuse new ones."""
        with self._lock:
            self._stopped = True
            parts = list(self._parts)
        for part in reversed(parts):  # the host before the hops that carry it
            if isinstance(part, socket.socket):
                with contextlib.suppress(OSError):
                    part.shutdown(socket.SHUT_RDWR)
            else:
                with contextlib.suppress(Exception):
                    part.close()

    def close(self) -> None:
        """:meth:`stop`, then wait (bounded) for every transport thread and proxy command to end."""
        self.stop()
        with self._lock:
            parts = list(self._parts)
        for part in parts:
            if isinstance(part, paramiko.Transport):
                if part.is_alive():
                    part.join(_JOIN_TIMEOUT)
                _end_handshake_timer(part)
            elif isinstance(part, paramiko.ProxyCommand):
                try:
                    part.process.wait(_JOIN_TIMEOUT)
                except subprocess.TimeoutExpired:
                    part.process.kill()
                    part.process.wait()
                # paramiko's close() only signals the command; its pipes are ours to close.
                for pipe in (part.process.stdin, part.process.stdout, part.process.stderr):
                    if pipe is not None:
                        pipe.close()
            elif isinstance(part, socket.socket):
                part.close()

    def _keep(self, part: Any) -> None:
        with self._lock:
            self._parts.append(part)
            stopped = self._stopped
        if stopped:
            self.stop()
            raise EOFError("closed before the handshake")

    def connect(self, cfg: HostConfig, sock: Any = None, *, depth: int = 0) -> Connection:
        """Connect to ``cfg``'s host (over ``sock`` if given, else by its route), check it, authenticate."""
        jumps: list[Connection] = []
        if sock is None:
            sock, jumps = self._route(cfg, depth)
        try:
            known = KnownHosts.read(cfg.known_hosts_files, cfg.host_key_name)
            transport = paramiko.Transport(sock)
            transport.name = "wqs-paramiko-transport"
            transport.set_log_channel(LOGGER_NAME)
            transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = self.timeout
            options = transport.get_security_options()
            # Ask for a host key type we know, as ssh does, so a known host is not "unknown".
            options.key_types = sorted(options.key_types, key=lambda a: key_type_of(a) not in known.keys)
            if self._fast_cipher and FAST_CIPHER in options.ciphers:
                options.ciphers = [FAST_CIPHER, *(c for c in options.ciphers if c != FAST_CIPHER)]
            if self._adopt is not None:
                self._adopt(transport)
            self._keep(transport)
            transport.start_client(timeout=self.timeout)
            known.check(transport.get_remote_server_key())
            authenticate(transport, cfg, self._notes)
        except BaseException:
            for jump in jumps:
                jump.close()
            raise
        return Connection(transport, cfg, jumps)

    def _route(self, cfg: HostConfig, depth: int) -> tuple[Any, list[Connection]]:
        if cfg.proxy_jump:
            if depth >= _MAX_HOPS:
                raise JumpFailed(cfg, ValueError(f"more than {_MAX_HOPS} ProxyJump hops (a loop?)"))
            *before, last = cfg.proxy_jump
            hop = read_hop(last, cfg.config_file, jumps=before or None)
            try:
                jump = self.connect(hop, depth=depth + 1)
            except JumpFailed:
                raise  # a hop further out: its own name is the one to give
            except Exception as exc:
                raise JumpFailed(hop, exc) from exc
            try:
                chan = jump.transport.open_channel(
                    "direct-tcpip", (cfg.hostname, cfg.port), ("127.0.0.1", 0), timeout=self.timeout
                )
            except paramiko.ChannelException as exc:
                jump.close()
                refused = tcpconn.ConnectFailed(
                    FailureKind.REFUSED,
                    f"{hop.name} could not connect to {cfg.hostname} port {cfg.port}: {exc.text}",
                )
                raise JumpFailed(hop, refused) from None
            except BaseException:
                jump.close()
                raise
            return _HopChannel(chan), [jump, *jump.jumps]
        if cfg.proxy_command is not None:
            argv = owned_argv(["/bin/sh", "-c", f"exec {cfg.proxy_command}"])
            proxy = paramiko.ProxyCommand(shlex.join(argv))
            self._keep(proxy)
            return proxy, []
        sock = tcp_connect(cfg.hostname, cfg.port, self.timeout)
        self._keep(sock)
        return sock, []


class _HopChannel:
    """A hop's ``direct-tcpip`` channel as the socket of the next Transport.

    Closing it never raises: the next Transport's thread closes its socket
    last, when the hop's connection may already be gone.
    """

    def __init__(self, chan: Any) -> None:
        self._chan = chan

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chan, name)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._chan.close()


def tcp_connect(host: str, port: int, timeout: float) -> socket.socket:
    """A blocking TCP connection to ``host:port``; raises :class:`ConnectFailed` as the async one does."""
    try:
        sock = socket.create_connection((host, port), timeout)
    except socket.gaierror as exc:
        raise tcpconn.ConnectFailed(
            FailureKind.RESOLVE, f"Could not resolve hostname {host}: {exc.strerror}"
        ) from None
    except TimeoutError:
        raise tcpconn.ConnectFailed(
            FailureKind.NETWORK, f"connect to host {host} port {port}: Connection timed out"
        ) from None
    except OSError as exc:
        kind = FailureKind.REFUSED if exc.errno == errno.ECONNREFUSED else FailureKind.NETWORK
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise tcpconn.ConnectFailed(kind, f"connect to host {host} port {port}: {reason}") from None
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def authenticate(transport: Any, cfg: HostConfig, notes: MutableSequence[str]) -> None:
    """Offer each identity file's key, then the agent's (unless IdentitiesOnly), as ssh does."""
    tried: list[str] = []
    skipped: list[str] = []
    agent = None
    keys: list[tuple[str, Any]] = list(load_keys(cfg.identity_files, skipped))
    if os.environ.get("SSH_AUTH_SOCK") and not cfg.identities_only and cfg.use_agent:
        agent = paramiko.Agent()
        keys += [(f"agent key {k.get_name()}", k) for k in agent.get_keys()]
    try:
        for label, key in keys:
            tried.append(label)
            try:
                transport.auth_publickey(cfg.user, key)
            except paramiko.BadAuthenticationType:
                break
            except paramiko.AuthenticationException:
                continue
            if transport.is_authenticated():
                return
    finally:
        if agent is not None:
            agent.close()
    notes.extend(skipped)
    raise PublicKeyRefused(
        f"{cfg.user}@{cfg.hostname}: Permission denied (publickey); "
        f"keys tried: {', '.join(tried) or 'none (no IdentityFile exists)'}"
    )


_DRAIN_CHUNK = 65536


def drain_channel(chan: Any, deadline: float | None, out: bytearray | None, err: bytearray | None) -> bool:
    """Read both streams of ``chan`` (into ``out`` and ``err``, or nowhere) until end of file;
    False when ``deadline`` came first.

    Both are read as they come: a command that writes much to one of them must
    not fill the channel's window while we wait on the other.
    """
    while True:
        if chan.recv_stderr_ready():
            data = chan.recv_stderr(_DRAIN_CHUNK)
            if err is not None:
                err += data
        elif chan.recv_ready():
            data = chan.recv(_DRAIN_CHUNK)
            if out is not None:
                out += data
        elif chan.eof_received or chan.closed:
            return True
        else:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            select.select([chan], [], [], left)


def exec_command(transport: Any, command: str, stdin: bytes, timeout: float) -> tuple[int, str, str]:
    """Run ``command`` on an exec channel of ``transport``, ``stdin`` then end of file; (status, out, err).

    Writing waits at most ``timeout`` (``socket.timeout`` past it), and so do
    reading both streams to their end and the exit status (``TimeoutError``);
    the status is -1 when the command ended without one (killed by a signal).
    """
    chan = transport.open_session(timeout=timeout)
    try:
        chan.settimeout(timeout)
        chan.exec_command(command)
        if stdin:
            chan.sendall(stdin)
        chan.shutdown_write()
        out, err = bytearray(), bytearray()
        if not drain_channel(chan, time.monotonic() + timeout, out, err):
            raise TimeoutError(f"{command!r} did not end within {timeout:g} s")
        if not chan.status_event.wait(timeout):
            raise TimeoutError(f"no exit status from {command!r} within {timeout:g} s")
        status = chan.exit_status
    finally:
        chan.close()
    return int(status), out.decode(errors="replace"), err.decode(errors="replace")


async def run_once(
    cfg: HostConfig, command: str, stdin: bytes, timeout: float, *, fast_cipher: bool
) -> HeadRun:
    """Run ``command`` on ``cfg``'s host over a connection of its own, made and closed for it.

    Status None when the host could not be reached, refused us, or the whole
    of it took more than ``timeout`` (the connection is then cut).
    """
    notes: list[str] = []
    dialer = Dialer(timeout, notes=notes, fast_cipher=fast_cipher)

    def blocking() -> HeadRun:
        try:
            conn = dialer.connect(cfg)
            status, out, err = exec_command(conn.transport, command, stdin, timeout)
            return HeadRun(status if status >= 0 else None, out, err)
        except Exception as exc:
            return HeadRun(None, "", "\n".join([*notes, str(exc) or type(exc).__name__]))
        finally:
            dialer.close()

    done = asyncio.get_running_loop().run_in_executor(None, blocking)
    try:
        return await asyncio.wait_for(asyncio.shield(done), timeout)
    except BaseException as exc:
        dialer.stop()  # wakes the thread wherever it waits
        await asyncio.shield(done)
        if isinstance(exc, TimeoutError):
            return HeadRun(None, "", f"{command!r} did not end within {timeout:g} s")
        raise


# -- what went wrong ---------------------------------------------------------------


class PortForwardRefused(Exception):
    """The head node refused the ``tcpip-forward`` request for the remote port."""

    def __init__(self, port: int) -> None:
        super().__init__(f"the head node refused to forward port {port}")
        self.port = port


REFUSALS = (
    PortForwardRefused,
    PublicKeyRefused,
    UnknownHostKey,
    RevokedHostKey,
    HostCertificateUnsupported,
    JumpFailed,
    TunnelError,
)
"""What a session reports as a failure of its own kind, not as a crash."""


def failure_of(exc: BaseException, dest: str, where: str, *, authenticated: bool) -> SessionFailure:
    """The failure a paramiko (or socket) exception means; ``where`` is the sshd's host and port."""
    if isinstance(exc, JumpFailed):
        hop = exc.hop
        return failure_of(exc.cause, hop.name, f"{hop.hostname} port {hop.port}", authenticated=False)
    if isinstance(exc, tcpconn.ConnectFailed):
        return exc.failure(dest)
    if isinstance(exc, PortForwardRefused):
        return SessionFailure.port_taken(dest, exc.port)
    if isinstance(exc, RevokedHostKey):
        return SessionFailure.host_key_revoked(dest)
    if isinstance(exc, paramiko.BadHostKeyException):
        return SessionFailure.host_key_changed(dest)
    if isinstance(exc, UnknownHostKey):
        return SessionFailure.host_key_unknown(dest)
    if isinstance(exc, (PublicKeyRefused, paramiko.AuthenticationException)):
        return SessionFailure.auth(dest, str(exc))
    if isinstance(exc, HostCertificateUnsupported):
        return SessionFailure(
            FailureKind.HOST_KEY_UNKNOWN,
            str(exc),
            "add the head node's host key itself to known_hosts (ssh-keyscan, checked with its admins), "
            "or use backend='openssh'",
            permanent=True,
        )
    if isinstance(exc, TunnelError):
        return SessionFailure(FailureKind.CONFIG, exc.message, exc.hint or "", permanent=True)
    detail = str(exc) or type(exc).__name__
    if not authenticated:
        return SessionFailure.network(dest, f"connection to {where} failed during the handshake: {detail}")
    return SessionFailure.network(dest, f"connection to {where} closed by remote host ({detail})")

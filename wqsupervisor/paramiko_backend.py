"""The paramiko transport: the tunnel's SSH connection made in Python, without an ssh process.

:class:`ParamikoSession` implements :class:`~wqsupervisor.session.Session` and
:class:`ParamikoSessions` its factory (``Settings(backend="paramiko")``)::

    TCP connection (tcpconn.open_connection: TCP_NODELAY, retransmission cap),
    or a ProxyJump hop's direct-tcpip channel, or a ProxyCommand's pipes
      -> paramiko Transport: host key from known_hosts, public key auth
      -> tcpip-forward REMOTE_BIND:REMOTE   each incoming channel <-> 127.0.0.1:MASTER
      -> session channel running session.REMOTE_COMMAND (remote pid, pings)
      -> direct-tcpip channels to the head's 127.0.0.1:REMOTE for probes

* No ssh binary is run. Host, port, user, identity files, known_hosts files
  and the route come from the user's ssh config read with paramiko's
  ``SSHConfig`` (:mod:`wqsupervisor.paramiko_config`); host keys are checked
  as ssh checks them and never added, and a host known only through a
  ``@cert-authority`` line is refused (:mod:`wqsupervisor.sshkeys`);
  ProxyJump and ProxyCommand go through paramiko too, each hop checked and
  authenticated on its own (:mod:`wqsupervisor.paramiko_connect`). Failures
  are classified from paramiko's exception types (:func:`failure_of`).
* Head-node commands (who holds a refused remote port, ending a stale
  session, the head probe behind a proxy) run on exec channels
  (:meth:`ParamikoSessions.run_on_head`).
* The session channel is not decoration: sshd sets TCP_NODELAY on its side
  only once a session starts, and without it Work Queue's small writes wait on
  delayed ACKs (0.055 of direct task throughput, against 0.66 with it).
* Paramiko blocks, so all of it runs in threads
  (:mod:`wqsupervisor.paramiko_threads`). The loop itself never waits on
  paramiko; it only shuts the socket down. :meth:`ParamikoSession.close`
  joins every thread.

**Where it runs.** The engine runs this backend in the supervisor's agent
process, never in the application's. ndcctools' ``q.wait(t)`` holds the GIL
for its whole duration, so a forwarder thread inside the application is frozen
while the application waits: a worker's message, a status request or a
keepalive that reaches it waits for a gap between two ``wait()`` calls, every
hop of the relay (paramiko's thread, the connect, each direction) needs a gap
of its own, and the master, which answers only from inside ``wait()``, needs
yet another one to get its reply out. Measured with Debian's SWIG master in
back-to-back ``q.wait(5)`` (``python3 benchmarks/paramiko_backend.py``, 2
cores, loopback sshd, 3 runs): a ``queue_status`` through the head node's
remote port was answered after 24.5 s (14.5-34.5 s) with this session inside
the application, and after 3.1 ms (2.9-4.4 ms) with it in the agent.

**What it costs.** Same run, interleaved: bulk (256 MiB through the reverse
forward, median of 3) 172 MB/s against OpenSSH's 376 MB/s, a ratio of 0.42;
Work Queue empty tasks (200 tasks, 2 workers, steady rate, median of 5) 0.54
of direct against OpenSSH's 0.71, a ratio of 0.76 (0.69-1.00). The OpenSSH
backend stays the default.

Exit codes follow ssh's: 255 when the connection failed or was lost, the
remote command's status when it ended on its own, ``-signal`` when the
session was stopped here (:meth:`~ParamikoSession.close` is ``-SIGTERM``,
:meth:`~ParamikoSession.kill_now` ``-SIGKILL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections import deque
from typing import Any

import paramiko

from . import tcpconn
from .logs import get_logger
from .paramiko_config import HostConfig, read_head
from .paramiko_connect import (
    REFUSALS,
    Dialer,
    PortForwardRefused,
    exec_command,
    failure_of,
    run_once,
)
from .paramiko_threads import SessionThreads
from .session import (
    REMOTE_COMMAND,
    HeadAddress,
    HeadRun,
    RemoteLines,
    SessionEnded,
    SessionFailure,
    lease_command,
)
from .target import SshTarget

__all__ = ["ParamikoSession", "ParamikoSessions", "failure_of"]

_JOIN_TIMEOUT = 5.0


class ParamikoSession:
    """One tunnel connection made with paramiko.

    Build it with :meth:`start` inside the event loop that will use it. It
    connects in the background: failures come out of :meth:`established`,
    :meth:`exited` and :meth:`failure`.
    """

    pid: int | None = None  # no process: the session lives in this one

    def __init__(
        self, target: SshTarget, config: HostConfig, *, master_port: int | None, remote_port: int
    ) -> None:
        self.sock: socket.socket | None = None
        self.remote_port = remote_port
        self.allocated_port: int | None = None
        self._target = target
        self._config = config
        self._master_port = master_port
        self._loop = asyncio.get_running_loop()
        self._notes: deque[str] = deque(maxlen=60)
        self._lines = RemoteLines()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._failure: SessionFailure | None = None
        self._threads = SessionThreads(self._loop, lambda: SessionEnded(self.returncode))
        self._stopped_by: int | None = None
        self._main: Any = None
        self._dialer = Dialer(
            target.connect_timeout,
            notes=self._notes,
            fast_cipher=target.option("Ciphers") is None,
            adopt=self._threads.adopt,
        )
        self._transport: Any = None
        self._chan: Any = None
        self._authenticated = False
        self._runner = asyncio.create_task(self._connect(), name="paramiko-connect")
        self._runner.add_done_callback(self._connect_done)

    @classmethod
    async def start(
        cls, target: SshTarget, config: HostConfig, *, master_port: int | None, remote_port: int
    ) -> ParamikoSession:
        """Begin a session (``master_port`` None: no reverse forward, probes only)."""
        return cls(target, config, master_port=master_port, remote_port=remote_port)

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self._exited.result()}"
        return f"<ParamikoSession {self._config.hostname}:{self._config.port} {state}>"

    # -- what the tunnel reads -------------------------------------------------------------

    @property
    def remote_pid(self) -> int | None:
        """The head's sshd process of this session, once it has greeted us."""
        return self._lines.remote_pid

    @property
    def stderr(self) -> str:
        """Notes for a person: skipped keys, failed forwarded connections, how the session ended."""
        return "\n".join(self._notes)

    @property
    def running(self) -> bool:
        """True until the connection has ended."""
        return not self._exited.done()

    @property
    def returncode(self) -> int | None:
        """The exit code once the session has ended, else None (like ``Popen.returncode``)."""
        return self._exited.result() if self._exited.done() else None

    def failure(self) -> SessionFailure:
        """How the session ended, from the exception that ended it."""
        return self._failure or SessionFailure.exited(self.returncode)

    async def established(self) -> None:
        """Wait until the remote command runs; raises :class:`SessionEnded` if the session ends first."""
        await asyncio.shield(self._lines.greeted)

    async def exited(self) -> int:
        """Wait for the session to end; returns its exit code."""
        return await asyncio.shield(self._exited)

    async def ping(self) -> float:
        """One round trip through the session channel; returns its seconds (wrap it in a timeout)."""
        if not self.running:
            raise SessionEnded(self.returncode)
        await self.established()
        return await self._lines.ping(self._send)

    async def _send(self, line: bytes) -> None:
        await self._threads.call(self._send_line, line)

    async def open_probe(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection that enters the head node's 127.0.0.1:REMOTE through this session."""
        await self.established()
        ours = await self._threads.call(self._open_probe, discard=lambda s: s.close())
        return await asyncio.open_connection(sock=ours)

    async def run(self, command: str, stdin: bytes, timeout: float) -> HeadRun:
        """Run ``command`` on an exec channel of this session's own connection."""
        await self.established()
        transport = self._transport
        try:
            status, out, err = await self._threads.call(exec_command, transport, command, stdin, timeout)
        except (paramiko.SSHException, EOFError, OSError, SessionEnded) as exc:
            return HeadRun(None, "", str(exc) or type(exc).__name__)
        return HeadRun(status if status >= 0 else None, out, err)

    # -- stopping ------------------------------------------------------------------------------

    def kill_now(self) -> None:
        """End the session without waiting (the supervisor itself is dying)."""
        self._stop(signal.SIGKILL)

    async def close(self, grace: float = 2.0) -> int | None:
        """End the session and wait until every thread, channel and socket of it is gone."""
        self._stop(signal.SIGTERM)
        code: int | None = None
        try:
            # Nothing is left to escalate to: shutting the socket down is the SIGKILL.
            code = await asyncio.wait_for(self.exited(), max(grace, _JOIN_TIMEOUT))
        except TimeoutError:
            get_logger().warning("paramiko.close_timeout", host=self._config.hostname)
        await self._threads.join(_JOIN_TIMEOUT)
        return code

    def _stop(self, sig: int) -> None:
        if not self.running:
            return
        if self._stopped_by is None:
            self._stopped_by = -sig
        if self._main is None:
            self._runner.cancel()
            return
        sock = self.sock
        if sock is not None:
            # Wakes paramiko's thread; everything else unwinds from there.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        # In the middle of its handshake a transport may not notice the shutdown
        # before its own timeouts; closing it (and every hop, proxy) ends that wait too.
        self._dialer.stop()

    # -- the loop side ---------------------------------------------------------------------------

    async def _connect(self) -> None:
        cfg, t = self._config, self._target
        sock = None
        if not cfg.proxied:
            try:
                sock = await tcpconn.open_connection(cfg.hostname, cfg.port, t.connect_timeout)
            except OSError as exc:
                self._finish(255, self._failure_of(exc))
                return
        # Behind a proxy the connection is made in the session's thread (the dialer's route).
        self.sock = sock
        self._main = self._threads.spawn(self._run, sock, name="wqs-paramiko-session")

    def _connect_done(self, task: asyncio.Task[None]) -> None:
        # Also covers a close() before the task ever ran, and our own bugs.
        if self._exited.done():
            return
        if task.cancelled():
            self._finish(self._stopped_by or -signal.SIGTERM, None)
        elif (exc := task.exception()) is not None:
            get_logger().error("paramiko.connect_crashed", host=self._config.hostname, error=repr(exc))
            self._finish(255, SessionFailure.exited(255, f"paramiko backend: internal error: {exc!r}"))

    def _failure_of(self, exc: BaseException) -> SessionFailure:
        where = f"{self._config.hostname} port {self._config.port}"
        return failure_of(exc, self._target.destination, where, authenticated=self._authenticated)

    def _finish(self, code: int, failure: SessionFailure | None) -> None:
        if failure is not None:
            self._failure = failure
            self._notes.append(failure.message)
        self.sock = None
        self._lines.ended(code)
        if not self._exited.done():
            self._exited.set_result(code)

    # -- the session thread ---------------------------------------------------------------------

    def _run(self, sock: socket.socket | None) -> None:
        code, failure = 255, None
        try:
            self._handshake(sock)
            self._read_session()
            code, failure = self._why_ended()
        except (*REFUSALS, paramiko.SSHException, EOFError, OSError) as exc:
            self._notes.extend(str(exc).splitlines())
            failure = self._failure_of(exc)
        except Exception as exc:
            get_logger().exception("paramiko.session_crashed", host=self._config.hostname)
            failure = SessionFailure.exited(255, f"paramiko backend: internal error: {exc!r}")
        finally:
            self._teardown(sock)
            if self._stopped_by is not None:
                code, failure = self._stopped_by, None
            self._threads.post(self._finish, code, failure)

    def _handshake(self, sock: socket.socket | None) -> None:
        t = self._target
        if self._stopped_by is not None:
            # close() came between the connection and the handshake: do not start it.
            raise EOFError("closed before the handshake")
        transport = self._dialer.connect(self._config, sock).transport
        self._transport = transport
        self._authenticated = True
        if self._master_port is not None:
            try:
                port = transport.request_port_forward(t.bind, self.remote_port, handler=self._incoming)
            except paramiko.SSHException:
                if not transport.is_active():
                    raise
                raise PortForwardRefused(self.remote_port) from None
            if self.remote_port == 0:
                self.allocated_port = int(port)
            self.remote_port = int(port)
        chan = transport.open_session(timeout=t.connect_timeout)
        self._chan = chan
        lease = lease_command(t.keepalive, self.remote_port)
        chan.exec_command(lease if self._master_port is not None else REMOTE_COMMAND)

    def _incoming(self, chan: Any, origin: tuple[str, int], server: tuple[str, int]) -> None:
        # Called in paramiko's transport thread, which must not wait on a connect.
        if self._threads.spawn(self._serve_forwarded, chan, name="wqs-paramiko-accept") is None:
            with contextlib.suppress(Exception):
                chan.close()

    def _serve_forwarded(self, chan: Any) -> None:
        assert self._master_port is not None
        try:
            sock = socket.create_connection(
                ("127.0.0.1", self._master_port), timeout=self._target.connect_timeout
            )
        except OSError as exc:
            self._notes.append(f"connect to localhost port {self._master_port} failed: {exc.strerror or exc}")
            with contextlib.suppress(Exception):
                chan.close()
            return
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._threads.relay(chan, sock)

    def _open_probe(self) -> socket.socket:
        transport = self._transport
        if transport is None or not transport.is_active():
            raise ConnectionResetError("the ssh connection is gone")
        try:
            chan = transport.open_channel(
                "direct-tcpip",
                ("127.0.0.1", self.remote_port),
                ("127.0.0.1", 0),
                timeout=self._target.connect_timeout,
            )
        except paramiko.ChannelException as exc:
            raise ConnectionRefusedError(
                f"the head node could not connect to 127.0.0.1:{self.remote_port}: {exc}"
            ) from None
        except paramiko.SSHException as exc:
            raise ConnectionResetError(f"the ssh connection is gone: {exc}") from None
        ours, theirs = socket.socketpair()
        self._threads.relay(chan, theirs)
        return ours

    def _send_line(self, data: bytes) -> None:
        chan = self._chan
        if chan is None:
            raise SessionEnded(None)
        chan.sendall(data)

    def _read_session(self) -> None:
        chan = self._chan
        pending = b""
        while data := chan.recv(4096):
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                self._threads.post(self._lines.feed, line.decode(errors="replace").strip())
        while chan.recv_stderr_ready():
            self._notes.extend(chan.recv_stderr(4096).decode(errors="replace").splitlines())

    def _why_ended(self) -> tuple[int, SessionFailure]:
        chan, transport = self._chan, self._transport
        # exit_status stays -1 without an exit-status message (no status, or a signal).
        status = int(chan.exit_status)
        if status >= 0:
            return (status or 255), SessionFailure.exited(
                status or 255, f"the remote command ended with status {status}"
            )
        # A dying connection closes its channels just before it marks itself dead.
        transport.join(0.5)
        if transport.is_active():
            detail = "the remote command ended without an exit status (killed on the head node?)"
            return 255, SessionFailure.exited(255, detail)
        return 255, self._failure_of(transport.get_exception() or EOFError("no reason given"))

    def _teardown(self, sock: socket.socket | None) -> None:
        self._threads.end()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._dialer.close()
        if sock is not None:
            sock.close()


class ParamikoSessions:
    """Starts a tunnel's sessions with paramiko, in this process."""

    name = "paramiko"

    def __init__(self, target: SshTarget) -> None:
        self.target = target
        self._config: HostConfig | None = None
        self._current: ParamikoSession | None = None

    async def prepare(self, rundir: str, tag: str) -> None:
        """Read the ssh config with paramiko (probes are channels: no files in ``rundir``)."""
        # In a thread: a 'Match exec' line runs a command.
        self._config = await asyncio.to_thread(read_head, self.target)

    @property
    def owns_socket(self) -> bool:
        """True unless proxied: then the connection is a jump host's channel or a proxy command's pipe."""
        return self._config is not None and not self._config.proxied

    @property
    def head(self) -> HeadAddress | None:
        """The head's sshd as the ssh config resolves it, unless a proxy is in the way."""
        cfg = self._config
        return None if cfg is None or cfg.proxied else HeadAddress(cfg.hostname, cfg.port)

    async def start(
        self, *, master_port: int | None, remote_port: int, probes: str | None
    ) -> ParamikoSession:
        """Begin a session; its failures come out of the session itself."""
        assert self._config is not None, "prepare() first"
        session = await ParamikoSession.start(
            self.target, self._config, master_port=master_port, remote_port=remote_port
        )
        self._current = session
        return session

    async def run_on_head(
        self, command: str, stdin: bytes = b"", timeout: float = 10.0, *, fresh: bool = False
    ) -> HeadRun:
        """Run ``command`` on the head node over paramiko: no ssh client is involved.

        On an exec channel of the last session's own connection while that
        session is up, else on a second connection made for the command (the
        same route, host key check and keys as a session's) and closed after
        it. In practice it is the second: the tunnel asks when it has no
        session (the head refused the port; a replaced session must be ended
        before the next starts), or, with ``fresh``, to learn whether a new
        connection reaches the head, which a stalled session's cannot tell.
        """
        assert self._config is not None, "prepare() first"
        session = self._current
        if not fresh and session is not None and session.running and session.remote_pid is not None:
            try:
                return await asyncio.wait_for(session.run(command, stdin, timeout), timeout + 1)
            except TimeoutError:
                return HeadRun(None, "", f"{command!r} did not end within {timeout:g} s")
        fast = self.target.option("Ciphers") is None
        return await run_once(self._config, command, stdin, timeout, fast_cipher=fast)

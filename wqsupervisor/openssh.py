"""The OpenSSH client transport: the ssh command line, its config, its errors, its session.

The tunnel is one ``ssh`` process that owns its own connection::

    ssh -T -R 127.0.0.1:REMOTE:localhost:MASTER -L RUNDIR/probe.sock:127.0.0.1:REMOTE \\
        head "exec sh -c 'echo wqs-session $PPID; exec cat'"

* The session (a remote command, not ``-N``) is what makes sshd set
  TCP_NODELAY; without it Work Queue's small writes wait on delayed ACKs.
* The remote command (:data:`~wqsupervisor.session.REMOTE_COMMAND`) names the
  head's sshd session and echoes our keepalives through the very connection
  that carries the forward.
* The ``-L`` unix socket leads to the head's ``127.0.0.1:REMOTE``, so a probe
  through it takes the same path as a worker on the head node.
* When it can, the supervisor opens the TCP connection itself and hands it to
  ssh (:mod:`wqsupervisor.tcpconn`).

The user's ``~/.ssh/config`` applies (ProxyJump, IdentityFile, Ciphers...),
except ControlMaster: a forward added through someone else's master
connection outlives our ssh and blocks every restart, so the tunnel always
opens its own connection. :class:`OpenSSHSessions` is this transport's
:class:`~wqsupervisor.session.SessionFactory`; failures are read from ssh's
stderr (:func:`classify`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import socket
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import tcpconn
from .errors import TunnelError
from .process import owned_argv
from .session import (
    FAST_CIPHER,
    REMOTE_COMMAND,
    HeadAddress,
    HeadRun,
    RemoteLines,
    SessionEnded,
    SessionFailed,
    SessionFailure,
    lease_command,
)
from .target import SshTarget

__all__ = [
    "FAST_CIPHER",
    "REMOTE_COMMAND",
    "OpenSSHSession",
    "OpenSSHSessions",
    "SshConfig",
    "allocated_port",
    "base_argv",
    "cipher_preference",
    "classify",
    "quote_argv",
    "read_config",
    "remote_argv",
    "run_remote",
    "spawn",
    "tunnel_argv",
]

# Options the tunnel cannot work without; they come first, so they win.
_FIXED_OPTIONS = (
    ("BatchMode", "yes"),
    ("ExitOnForwardFailure", "yes"),
    ("StreamLocalBindUnlink", "yes"),
    ("ControlMaster", "no"),
    ("ControlPath", "none"),
    ("ForwardAgent", "no"),
    ("ForwardX11", "no"),
    ("ClearAllForwardings", "no"),
)


@dataclass(frozen=True)
class SshConfig:
    """What ``ssh -G`` says the client will do for a destination."""

    hostname: str
    port: int
    user: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def proxied(self) -> bool:
        """True when the connection goes through a ProxyJump or ProxyCommand."""
        return any(self.options.get(k, "none") not in ("none", "") for k in ("proxyjump", "proxycommand"))

    @classmethod
    def parse(cls, text: str) -> SshConfig:
        """Read ``ssh -G`` output."""
        options: dict[str, str] = {}
        for line in text.splitlines():
            key, _, value = line.strip().partition(" ")
            if key and key not in options:
                options[key.lower()] = value
        return cls(
            hostname=options.get("hostname", ""),
            port=int(options.get("port", "22")),
            user=options.get("user", ""),
            options=options,
        )


def base_argv(target: SshTarget, *, config_file: str | None = None) -> list[str]:
    """The ssh options every call to ``target`` shares (no forwards, no destination)."""
    argv = [target.program]
    cfg = config_file if config_file is not None else target.config_file
    if cfg:
        argv += ["-F", cfg]
    if target.port:
        argv += ["-p", str(target.port)]
    if target.identity:
        argv += ["-i", target.identity]
    for key, value in _FIXED_OPTIONS:
        argv += ["-o", f"{key}={value}"]
    # ssh keeps the first value it sees for an option, so the user's come
    # before our defaults and win over them.
    for key, value in target.options:
        argv += ["-o", f"{key}={value}"]
    argv += [
        "-o",
        "ServerAliveInterval=15",
        "-o",
        # A backstop only: the supervisor decides when a silent session is
        # replaced, and keeps it through outages ssh alone would give up on.
        "ServerAliveCountMax=40",
        "-o",
        f"ConnectTimeout={max(1, int(target.connect_timeout))}",
    ]
    return argv


async def read_config(target: SshTarget, *, config_file: str | None = None) -> SshConfig:
    """Run ``ssh -G`` for the head node."""
    proc = await asyncio.create_subprocess_exec(
        *base_argv(target, config_file=config_file),
        "-G",
        target.destination,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise classify(err.decode(errors="replace"), proc.returncode, target).as_error()
    return SshConfig.parse(out.decode(errors="replace"))


async def cipher_preference(target: SshTarget, config: SshConfig) -> list[str]:
    """``-o Ciphers=^aes128-gcm...`` unless the user chose ciphers; the server still decides.

    The user chose when ``--ssh-option Ciphers=...`` was given or when their
    config's cipher list differs from OpenSSH's built-in one.
    """
    if target.option("Ciphers") is not None:
        return []
    builtin = await read_config(target, config_file="/dev/null")
    chosen = config.options.get("ciphers", "")
    if chosen != builtin.options.get("ciphers", ""):
        return []
    if FAST_CIPHER not in chosen.split(","):
        return []
    return ["-o", f"Ciphers=^{FAST_CIPHER}"]


def tunnel_argv(
    target: SshTarget,
    *,
    master_port: int | None,
    remote_port: int,
    probe_path: str | None,
    extra: Sequence[str] = (),
    command: str | None = None,
) -> list[str]:
    """The full command line of the tunnel's ssh (``master_port`` None: the probe forward only).

    A session that forwards the port keeps a lease on the head (:func:`lease_command`).
    """
    if command is None:
        command = lease_command(target.keepalive, remote_port) if master_port is not None else REMOTE_COMMAND
    argv = base_argv(target)
    argv[1:1] = list(extra)
    argv.append("-T")
    if master_port is not None:
        argv += ["-R", f"{target.bind}:{remote_port}:localhost:{master_port}"]
    if probe_path is not None:
        argv += ["-L", f"{probe_path}:127.0.0.1:{remote_port}"]
    argv += [target.destination, command]
    return argv


def remote_argv(target: SshTarget, command: str) -> list[str]:
    """A one-off command on the head node, with the tunnel's ssh options (its own connection)."""
    return [*base_argv(target), "-T", target.destination, command]


async def run_remote(target: SshTarget, command: str, stdin: bytes, timeout: float) -> HeadRun:
    """Run ``command`` on the head node with ``ssh`` (:func:`remote_argv`); status None when it overran."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *remote_argv(target, command),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return HeadRun(None, "", f"cannot run {target.program}: {exc}")
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(exc, TimeoutError):
            return HeadRun(None)
        raise
    return HeadRun(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


# -- what went wrong ------------------------------------------------------------

_ALLOCATED = re.compile(r"Allocated port (\d+) for remote forward")
_NETWORK = re.compile(
    r"timed out|No route to host|Network is unreachable|Connection reset|closed by|kex_exchange|Broken pipe"
)
_FORWARD_FAILED = re.compile(r"remote port forwarding failed for listen port (\d+)")


def classify(
    stderr: str, exit_code: int | None, target: SshTarget, *, ever_up: bool = False
) -> SessionFailure:
    """Classify an ssh run from its stderr and exit status (``ever_up``: the tunnel was up before)."""
    failure = _classify(stderr.strip(), exit_code, target.destination)
    return failure.once_up() if ever_up else failure


def _classify(text: str, exit_code: int | None, dest: str) -> SessionFailure:
    last = _last_meaningful_line(text) or f"ssh exited with status {exit_code}"
    if m := _FORWARD_FAILED.search(text):
        return SessionFailure.port_taken(dest, int(m.group(1)))
    if "REVOKED HOST KEY DETECTED" in text:
        return SessionFailure.host_key_revoked(dest)
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or ("Host key for" in text and "has changed" in text):
        return SessionFailure.host_key_changed(dest)
    if any(words in text for words in _HOST_KEY_UNKNOWN):
        return SessionFailure.host_key_unknown(dest)
    if "Permission denied" in text or "Too many authentication failures" in text:
        return SessionFailure.auth(dest, last)
    if "Could not resolve hostname" in text or "Name or service not known" in text:
        return SessionFailure.unresolved(dest, last)
    if any(words in text for words in _CONFIG):
        return SessionFailure.config(last)
    if "Connection refused" in text:
        return SessionFailure.refused(dest, last)
    if _NETWORK.search(text):
        return SessionFailure.network(dest, last)
    if exit_code in (None, 0) or exit_code < 0:
        return SessionFailure.exited(exit_code)
    return SessionFailure.exited(exit_code, last)


_HOST_KEY_UNKNOWN = (
    "Host key verification failed",
    "No ED25519 host key is known",
    "No RSA host key is known",
)
_CONFIG = ("Bad configuration option", "command-line line", "Unsupported option", "usage: ssh")


def _last_meaningful_line(text: str) -> str:
    for raw in reversed(text.splitlines()):
        line = raw.strip().strip("@").strip()
        if line and not line.startswith(("Warning:", "debug")):
            return line
    return ""


def allocated_port(stderr: str) -> int | None:
    """The port sshd chose for ``-R 0:...``, from ssh's stderr."""
    m = _ALLOCATED.search(stderr)
    return int(m.group(1)) if m else None


# -- the running session ----------------------------------------------------------


async def spawn(
    argv: Sequence[str], probe_path: str | None, stdio: tuple[int, int] | None = None
) -> asyncio.subprocess.Process:
    """Run a session's ssh, owned (SIGTERM from the kernel if this process dies), with pipes on every end.

    ``stdio``: descriptors for ssh's stdin and stdout instead of stream pipes.
    A probe socket left by an earlier session is removed first: ssh will not bind over it.
    """
    if probe_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe_path)
    stdin, stdout = stdio or (asyncio.subprocess.PIPE, asyncio.subprocess.PIPE)
    return await asyncio.create_subprocess_exec(
        *owned_argv(argv),
        stdin=stdin,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )


class OpenSSHSession:
    """One running tunnel ssh: its stdin/stdout carry keepalives, stderr its diagnostics."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        target: SshTarget,
        probe_path: str | None,
        sock: socket.socket | None = None,
    ) -> None:
        self.proc = proc
        self.target = target
        self.probe_path = probe_path
        # Our copy of the connection handed to ssh (for TCP_INFO); closed as soon
        # as ssh exits, or the head would see the connection live on.
        self.sock = sock
        self._stderr: deque[str] = deque(maxlen=60)
        self._lines = RemoteLines()
        # Signals go through a pidfd: asyncio's Popen.terminate() polls, and a
        # poll can reap ssh under the child watcher's feet.
        try:
            self._pidfd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            self._pidfd = None
        self._readers = [
            asyncio.create_task(self._read_stdout(), name="ssh-stdout"),
            asyncio.create_task(self._read_stderr(), name="ssh-stderr"),
        ]
        self._exited = asyncio.create_task(self._wait_exit(), name="ssh-exit")

    @classmethod
    async def start(
        cls, argv: Sequence[str], target: SshTarget, probe_path: str | None, sock: socket.socket | None = None
    ) -> OpenSSHSession:
        """Start ssh; it gets SIGTERM from the kernel if this process dies."""
        return cls(await spawn(argv, probe_path), target, probe_path, sock)

    @property
    def pid(self) -> int:
        """The local ssh process id."""
        return self.proc.pid

    @property
    def remote_pid(self) -> int | None:
        """The head's sshd process of this session, once it has greeted us."""
        return self._lines.remote_pid

    @property
    def allocated_port(self) -> int | None:
        """The port sshd chose for ``-R 0:...``, once ssh has said so."""
        return allocated_port(self.stderr)

    @property
    def stderr(self) -> str:
        """The last lines ssh wrote to stderr."""
        return "\n".join(self._stderr)

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self._lines.feed(raw.decode(errors="replace").strip())

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self._stderr.append(raw.decode(errors="replace").rstrip())

    async def _wait_exit(self) -> int:
        code = await self.proc.wait()
        self._close_sock()
        # Let the readers take the last words before anyone classifies them.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._readers, return_exceptions=True), 1.0)
        self._lines.ended(code)
        return code

    async def established(self) -> None:
        """Wait until the remote command runs; raises :class:`SessionEnded` if ssh exits first."""
        await asyncio.shield(self._lines.greeted)

    async def exited(self) -> int:
        """Wait for ssh to exit; returns its exit status."""
        return await asyncio.shield(self._exited)

    def failure(self) -> SessionFailure:
        """How ssh ended, read from its stderr."""
        return classify(self.stderr, self.proc.returncode, self.target)

    @property
    def running(self) -> bool:
        """True until ssh has exited."""
        return not self._exited.done()

    async def ping(self) -> float:
        """One round trip through the session; returns its seconds (wrap it in a timeout)."""
        if not self.running:
            raise SessionEnded(self.proc.returncode)
        return await self._lines.ping(self._send)

    async def _send(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line)
        await self.proc.stdin.drain()

    async def open_probe(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection that enters the head node's remote port through this session."""
        if self.probe_path is None:
            raise OSError("this session has no probe socket")
        return await asyncio.open_unix_connection(self.probe_path)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to ssh if it is still running."""
        if not self.running:
            return
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.proc.pid, sig)

    async def close(self, grace: float = 2.0) -> int | None:
        """Stop ssh (SIGTERM, then SIGKILL) and reap it."""
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.exited(), grace)
        except TimeoutError:
            self.signal(signal.SIGKILL)
        code = await self.exited()
        for task in self._readers:
            task.cancel()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._close_sock()
        if self.probe_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.probe_path)
        return code

    def _close_sock(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def kill_now(self) -> None:
        """SIGKILL ssh without waiting (used when the supervisor itself is dying)."""
        self.signal(signal.SIGKILL)


class OpenSSHSessions:
    """Starts a tunnel's sessions as ``ssh`` processes, on a connection of our own when it can."""

    name = "openssh"

    def __init__(self, target: SshTarget, *, own_socket: bool = True) -> None:
        self.target = target
        self._own_socket = own_socket
        self._config: SshConfig | None = None
        self._extra: list[str] = []
        self._handoff: tcpconn.Handoff | None = None
        self._rundir = ""
        self._tag = ""

    async def prepare(self, rundir: str, tag: str) -> None:
        """Read ``ssh -G``, choose the cipher, and get ready to hand ssh its connection."""
        self._rundir, self._tag = rundir, tag
        self._config = await read_config(self.target)
        self._extra = await cipher_preference(self.target, self._config)
        if self._own_socket and not self._config.proxied and tcpconn.fd_passing_supported():
            self._handoff = tcpconn.Handoff(rundir, tag)

    @property
    def owns_socket(self) -> bool:
        """True when the supervisor opens the TCP connection and hands it to ssh."""
        return self._handoff is not None

    @property
    def head(self) -> HeadAddress | None:
        """The head's sshd as ``ssh -G`` resolves it, unless a proxy is in the way."""
        cfg = self._config
        return None if cfg is None or cfg.proxied else HeadAddress(cfg.hostname, cfg.port)

    async def start(self, *, master_port: int | None, remote_port: int, probes: str | None) -> OpenSSHSession:
        """Start one ssh; raises :class:`SessionFailed` when our own connection to the head fails."""
        probe_path = os.path.join(self._rundir, f"{probes}-{self._tag}.sock") if probes else None
        argv = self._argv(master_port=master_port, remote_port=remote_port, probe_path=probe_path)
        try:
            if self._handoff is None:
                return await self._spawn(argv, probe_path, None)
            return await self._start_handed(argv, probe_path, self._handoff)
        except tcpconn.ConnectFailed as exc:
            raise SessionFailed(exc.failure(self.target.destination)) from None
        except OSError as exc:
            raise TunnelError(
                f"cannot run {self.target.program}: {exc}",
                "install the OpenSSH client (apt-get install openssh-client) or set ssh_program",
            ) from exc

    async def run_on_head(
        self, command: str, stdin: bytes = b"", timeout: float = 10.0, *, fresh: bool = False
    ) -> HeadRun:
        """Run ``command`` with a one-off ``ssh head`` (always a connection of its own)."""
        return await run_remote(self.target, command, stdin, timeout)

    def _argv(self, *, master_port: int | None, remote_port: int, probe_path: str | None) -> list[str]:
        """The command line of one session (a subclass may run another remote command)."""
        return tunnel_argv(
            self.target,
            master_port=master_port,
            remote_port=remote_port,
            probe_path=probe_path,
            extra=[*self._extra, *(self._handoff.ssh_options() if self._handoff else [])],
        )

    async def _spawn(
        self, argv: list[str], probe_path: str | None, sock: socket.socket | None
    ) -> OpenSSHSession:
        """Run ``argv`` as one session (a subclass may make another kind of session)."""
        return await OpenSSHSession.start(argv, self.target, probe_path, sock)

    async def _start_handed(
        self, argv: list[str], probe_path: str | None, handoff: tcpconn.Handoff
    ) -> OpenSSHSession:
        cfg = self._config
        assert cfg is not None
        timeout = self.target.connect_timeout
        sock = await tcpconn.open_connection(cfg.hostname, cfg.port, timeout)
        try:
            async with handoff.offer(sock, timeout) as handed:
                session = await self._spawn(argv, probe_path, sock)
                await asyncio.wait(
                    [handed, asyncio.create_task(session.exited())],
                    timeout=timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        except BaseException:
            sock.close()
            raise
        return session


def quote_argv(argv: Sequence[str]) -> str:
    """``argv`` as a shell line, for logs and error messages."""
    return " ".join(shlex.quote(a) for a in argv)

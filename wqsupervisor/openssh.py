"""The OpenSSH client backend: the ssh command line, its config, its errors, its session.

The tunnel is one ``ssh`` process that owns its own connection::

    ssh -T -R 127.0.0.1:REMOTE:localhost:MASTER -L RUNDIR/probe.sock:127.0.0.1:REMOTE \\
        head "exec sh -c 'echo wqs-session $PPID; exec cat'"

* The session (a remote command, not ``-N``) is what makes sshd set
  TCP_NODELAY; without it Work Queue's small writes wait on delayed ACKs.
* The remote ``cat`` echoes our keepalive lines, which measures the round trip
  through the very connection that carries the forward, and it ends when the
  session ends, so nothing is left running on the head node.
* ``$PPID`` is the head's sshd process for this session: the one to end if the
  session outlives its client and keeps the remote port bound.
* The ``-L`` unix socket leads to the head's ``127.0.0.1:REMOTE``, so a probe
  through it takes the same path as a worker on the head node.

The user's ``~/.ssh/config`` applies (ProxyJump, IdentityFile, Ciphers...),
except ControlMaster: a forward added through someone else's master
connection outlives our ssh and blocks every restart, so the tunnel always
opens its own connection.
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
from typing import TYPE_CHECKING

from .process import owned_argv

if TYPE_CHECKING:
    from .config import Settings
    from .target import SshTarget

REMOTE_COMMAND = "exec sh -c 'echo wqs-session $PPID; exec cat'"
FAST_CIPHER = "aes128-gcm@openssh.com"

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


def base_argv(settings: Settings, *, config_file: str | None = None) -> list[str]:
    """The ssh options every call for these settings shares (no forwards, no destination)."""
    argv = [settings.ssh_program]
    cfg = config_file if config_file is not None else settings.ssh_config
    if cfg:
        argv += ["-F", cfg]
    if settings.ssh_port:
        argv += ["-p", str(settings.ssh_port)]
    if settings.identity:
        argv += ["-i", settings.identity]
    for key, value in _FIXED_OPTIONS:
        argv += ["-o", f"{key}={value}"]
    # ssh keeps the first value it sees for an option, so the user's come
    # before our defaults and win over them.
    for key, value in settings.ssh_options:
        argv += ["-o", f"{key}={value}"]
    argv += [
        "-o",
        "ServerAliveInterval=15",
        "-o",
        # A backstop only: the supervisor decides when a silent session is
        # replaced, and keeps it through outages ssh alone would give up on.
        "ServerAliveCountMax=40",
        "-o",
        f"ConnectTimeout={max(1, int(settings.connect_timeout))}",
    ]
    return argv


async def read_config(settings: Settings, *, config_file: str | None = None) -> SshConfig:
    """Run ``ssh -G`` for the head node with these settings."""
    assert settings.via is not None
    proc = await asyncio.create_subprocess_exec(
        *base_argv(settings, config_file=config_file),
        "-G",
        settings.via,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise SshFailure.from_output(
            err.decode(errors="replace"), proc.returncode, settings, ever_up=False
        ).as_error()
    return SshConfig.parse(out.decode(errors="replace"))


async def cipher_preference(settings: Settings, config: SshConfig) -> list[str]:
    """``-o Ciphers=^aes128-gcm...`` unless the user chose ciphers; the server still decides.

    The user chose when ``--ssh-option Ciphers=...`` was given or when their
    config's cipher list differs from OpenSSH's built-in one.
    """
    if any(k.lower() == "ciphers" for k, _ in settings.ssh_options):
        return []
    builtin = await read_config(settings, config_file="/dev/null")
    chosen = config.options.get("ciphers", "")
    if chosen != builtin.options.get("ciphers", ""):
        return []
    if FAST_CIPHER not in chosen.split(","):
        return []
    return ["-o", f"Ciphers=^{FAST_CIPHER}"]


def tunnel_argv(
    settings: Settings,
    *,
    master_port: int | None,
    remote_port: int,
    probe_path: str | None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The full command line of the tunnel's ssh (``master_port`` None: the probe forward only)."""
    assert settings.via is not None
    argv = base_argv(settings)
    argv[1:1] = list(extra)
    argv.append("-T")
    if master_port is not None:
        argv += ["-R", f"{settings.remote_bind}:{remote_port}:localhost:{master_port}"]
    if probe_path is not None:
        argv += ["-L", f"{probe_path}:127.0.0.1:{remote_port}"]
    argv += [settings.via, REMOTE_COMMAND]
    return argv


def remote_argv(settings: Settings, command: str) -> list[str]:
    """A one-off command on the head node with the tunnel's ssh settings."""
    assert settings.via is not None
    return [*base_argv(settings), "-T", settings.via, command]


def remote_argv_for(target: SshTarget, command: str) -> list[str]:
    """:func:`remote_argv` from an :class:`~wqsupervisor.target.SshTarget`: the batch runners' form.

    The same command line, option for option, as :func:`remote_argv` builds
    from the :class:`~wqsupervisor.config.Settings` that made ``target``.
    """
    argv = [target.program]
    if target.config_file:
        argv += ["-F", target.config_file]
    if target.port:
        argv += ["-p", str(target.port)]
    if target.identity:
        argv += ["-i", target.identity]
    for key, value in (*_FIXED_OPTIONS, *target.options):
        argv += ["-o", f"{key}={value}"]
    argv += ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=40"]
    argv += ["-o", f"ConnectTimeout={max(1, int(target.connect_timeout))}"]
    return [*argv, "-T", target.destination, command]


# -- what went wrong ------------------------------------------------------------

_ALLOCATED = re.compile(r"Allocated port (\d+) for remote forward")
_NETWORK = re.compile(
    r"timed out|No route to host|Network is unreachable|Connection reset|closed by|kex_exchange|Broken pipe"
)
_FORWARD_FAILED = re.compile(r"remote port forwarding failed for listen port (\d+)")


@dataclass(frozen=True)
class SshFailure:
    """How an ssh run ended, classified: ``permanent`` ones are not retried."""

    kind: str
    message: str
    hint: str
    permanent: bool
    port: int | None = None

    @classmethod
    def from_output(
        cls, stderr: str, exit_code: int | None, settings: Settings, *, ever_up: bool
    ) -> SshFailure:
        """Classify an ssh run from its stderr and exit status."""
        dest = settings.via or "the head node"
        text = stderr.strip()
        last = _last_meaningful_line(text) or f"ssh exited with status {exit_code}"
        by_hand = f"run 'ssh {dest}' once by hand to see what it asks"
        if m := _FORWARD_FAILED.search(text):
            port = int(m.group(1))
            return cls(
                "port_taken",
                f"the head node refused remote port {port}: it is already bound there",
                f"pick another --remote-port, or free port {port} on {dest}",
                permanent=True,
                port=port,
            )
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or (
            "Host key for" in text and "has changed" in text
        ):
            return cls(
                "host_key_changed",
                f"the host key of {dest} does not match known_hosts",
                "if the head node was reinstalled, check the new key with its admins and update "
                "known_hosts (ssh-keygen -R HOST); otherwise do not connect",
                permanent=True,
            )
        if (
            "Host key verification failed" in text
            or "No ED25519 host key is known" in text
            or "No RSA host key is known" in text
        ):
            return cls(
                "host_key_unknown",
                f"the host key of {dest} is not in known_hosts and ssh runs in batch mode",
                f"{by_hand} and accept the key after checking it",
                permanent=True,
            )
        if "Permission denied" in text or "Too many authentication failures" in text:
            return cls(
                "auth",
                f"ssh to {dest} failed: {last}",
                f"check --identity or IdentityFile, or {by_hand}",
                permanent=True,
            )
        if "Could not resolve hostname" in text or "Name or service not known" in text:
            return cls(
                "unknown_host",
                f"ssh cannot resolve {dest}: {last}",
                "check --via, or add the host to ~/.ssh/config",
                # After a Wi-Fi change name lookups fail for a while; only a
                # tunnel that never came up takes this as final.
                permanent=not ever_up,
            )
        if (
            "Bad configuration option" in text
            or "command-line line" in text
            or "Unsupported option" in text
            or "usage: ssh" in text
        ):
            return cls(
                "config",
                f"ssh rejected its options: {last}",
                "check --ssh-option and --config values",
                permanent=True,
            )
        if "Connection refused" in text:
            return cls(
                "refused",
                f"nothing accepts ssh connections at {dest}: {last}",
                "check --via and --ssh-port, and that sshd runs on the head node",
                permanent=False,
            )
        if _NETWORK.search(text):
            return cls("network", f"the connection to {dest} failed: {last}", "retrying", permanent=False)
        if exit_code in (None, 0) or exit_code < 0:
            return cls("exited", f"ssh ended ({_describe_exit(exit_code)})", "restarting", permanent=False)
        return cls("exited", f"ssh exited with status {exit_code}: {last}", "restarting", permanent=False)

    def as_error(self) -> Exception:
        """This failure as an exception for callers that raise."""
        from .errors import TunnelError

        return TunnelError(self.message, self.hint)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"status {code}"


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


class SessionEnded(Exception):
    """The ssh process exited; ``exit_code`` and ``stderr`` say how."""

    def __init__(self, exit_code: int | None, stderr: str) -> None:
        super().__init__(f"ssh exited ({_describe_exit(exit_code)})")
        self.exit_code = exit_code
        self.stderr = stderr


class OpenSSHSession:
    """One running tunnel ssh: its stdin/stdout carry keepalives, stderr diagnostics."""

    def __init__(
        self, proc: asyncio.subprocess.Process, probe_path: str | None, sock: socket.socket | None = None
    ) -> None:
        self.proc = proc
        self.probe_path = probe_path
        # Our copy of the connection handed to ssh (for TCP_INFO); closed as soon
        # as ssh exits, or the head would see the connection live on.
        self.sock = sock
        self.remote_pid: int | None = None
        self._stderr: deque[str] = deque(maxlen=60)
        self._established: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Nobody may be waiting when ssh dies first; the exit is reported elsewhere.
        self._established.add_done_callback(lambda f: f.cancelled() or f.exception())
        # Signals go through a pidfd: asyncio's Popen.terminate() polls, and a
        # poll can reap ssh under the child watcher's feet.
        try:
            self._pidfd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            self._pidfd = None
        self._pongs: dict[int, asyncio.Future[None]] = {}
        self._seq = 0
        self._readers = [
            asyncio.create_task(self._read_stdout(), name="ssh-stdout"),
            asyncio.create_task(self._read_stderr(), name="ssh-stderr"),
        ]
        self._exited = asyncio.create_task(self._wait_exit(), name="ssh-exit")

    @classmethod
    async def start(
        cls, argv: Sequence[str], probe_path: str | None, sock: socket.socket | None = None
    ) -> OpenSSHSession:
        """Start ssh; it gets SIGTERM from the kernel if this process dies."""
        if probe_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe_path)
        proc = await asyncio.create_subprocess_exec(
            *owned_argv(argv),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        return cls(proc, probe_path, sock)

    @property
    def pid(self) -> int:
        """The local ssh process id."""
        return self.proc.pid

    @property
    def stderr(self) -> str:
        """The last lines ssh wrote to stderr."""
        return "\n".join(self._stderr)

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("wqs-session "):
                with contextlib.suppress(ValueError):
                    self.remote_pid = int(line.split()[1])
                if not self._established.done():
                    self._established.set_result(None)
            elif line.startswith("wqs-ping "):
                with contextlib.suppress(ValueError):
                    fut = self._pongs.pop(int(line.split()[1]), None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)

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
        for fut in self._pongs.values():
            if not fut.done():
                fut.set_exception(SessionEnded(code, self.stderr))
        if not self._established.done():
            self._established.set_exception(SessionEnded(code, self.stderr))
        return code

    async def established(self) -> None:
        """Wait until the remote command runs; raises :class:`SessionEnded` if ssh exits first."""
        await asyncio.shield(self._established)

    async def exited(self) -> int:
        """Wait for ssh to exit; returns its exit status."""
        return await asyncio.shield(self._exited)

    @property
    def running(self) -> bool:
        """True until ssh has exited."""
        return not self._exited.done()

    async def ping(self) -> float:
        """One round trip through the session; returns its seconds (wrap it in a timeout)."""
        if not self.running:
            raise SessionEnded(self.proc.returncode, self.stderr)
        assert self.proc.stdin is not None
        self._seq += 1
        seq = self._seq
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs[seq] = fut
        loop = asyncio.get_running_loop()
        sent = loop.time()
        try:
            self.proc.stdin.write(f"wqs-ping {seq}\n".encode())
            await self.proc.stdin.drain()
            await fut
            return loop.time() - sent
        finally:
            self._pongs.pop(seq, None)

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


def quote_argv(argv: Sequence[str]) -> str:
    """``argv`` as a shell line, for logs and error messages."""
    return " ".join(shlex.quote(a) for a in argv)

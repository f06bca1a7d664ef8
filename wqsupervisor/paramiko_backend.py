"""The paramiko backend: the tunnel's SSH connection made in Python, without an ssh process.

:class:`ParamikoSession` does what the OpenSSH backend's ``ssh`` does
(:mod:`wqsupervisor.openssh`), with the same surface, so :class:`~wqsupervisor.tunnel.Tunnel`
drives either one (``Settings(backend="paramiko")``)::

    TCP connection (connection.open_connection: TCP_NODELAY, retransmission cap)
      -> paramiko Transport: host key from known_hosts, public key auth
      -> tcpip-forward REMOTE_BIND:REMOTE   each incoming channel <-> 127.0.0.1:MASTER
      -> session channel running openssh.REMOTE_COMMAND (remote pid, pings)
      -> direct-tcpip channels to the head's 127.0.0.1:REMOTE for probes

* Host, port, user, identity files and known_hosts files come from ``ssh -G``
  (the user's ssh config applies). Host keys are never added: an unknown or
  changed key ends the session with the words OpenSSH would use, so
  :meth:`SshFailure.from_output <wqsupervisor.openssh.SshFailure.from_output>`
  classifies both backends alike. ProxyJump and ProxyCommand are not supported.
* The session channel is not decoration: sshd sets TCP_NODELAY on its side
  only once a session starts, and without it Work Queue's small writes wait on
  delayed ACKs (0.055 of direct task throughput, against 0.66 with it).
* Paramiko blocks, so all of it runs in threads: paramiko's transport thread,
  one thread that connects and then reads the session channel, two per
  forwarded connection or probe (one per direction, so neither direction can
  starve the other), and one per blocking call the event loop asks for. The
  loop itself never waits on paramiko; it only shuts the socket down.
  :meth:`ParamikoSession.close` joins every one of them.

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
backend stays the default. This one still needs the ssh client for ``ssh -G``
and for the tunnel's look at who holds a taken remote port.

Exit codes follow ssh's: 255 when the connection failed or was lost, the
remote command's status when it ended on its own, ``-signal`` when the
session was stopped here (:meth:`~ParamikoSession.close` is ``-SIGTERM``,
:meth:`~ParamikoSession.kill_now` ``-SIGKILL``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import re
import signal
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import paramiko

from . import connection, openssh
from .logs import get_logger

if TYPE_CHECKING:
    from .config import Settings

T = TypeVar("T")

# paramiko's transport logs every dropped connection at ERROR; it goes to
# the application's logging if it has any, and nowhere otherwise.
LOGGER_NAME = "wqsupervisor.paramiko"
logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())

_BUFFER = 64 * 1024
_JOIN_TIMEOUT = 5.0
_ENDING_SIGNALS = frozenset({signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGHUP})
# Measured faster than paramiko's default aes128-ctr + hmac-sha2-256 (AEAD in one pass).
FAST_CIPHER = "aes128-gcm@openssh.com"
_SSH_KEY_NAMES = {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA", "ssh-dss": "DSA"}


class _Refused(Exception):
    """The head node refused us; the text is what ssh would have printed."""


# -- known_hosts -----------------------------------------------------------------


def host_key_name(config: openssh.SshConfig) -> str:
    """The name ssh looks the host key up by: HostKeyAlias, else ``host`` or ``[host]:port``."""
    alias = config.options.get("hostkeyalias", "none")
    if alias not in ("", "none"):
        return alias
    return config.hostname if config.port == 22 else f"[{config.hostname}]:{config.port}"


def known_hosts_files(config: openssh.SshConfig) -> list[str]:
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


def known_host_keys(files: Iterable[str], name: str) -> dict[str, list[Any]]:
    """The keys known for ``name`` in ``files``, by key type (plain, hashed and wildcard entries).

    Lines ssh would skip are skipped: comments, malformed keys, unknown key
    types, and ``@cert-authority``/``@revoked`` markers (not supported here).
    """
    found: dict[str, list[Any]] = {}
    for path in files:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", "@")):
                continue
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
            except (paramiko.hostkeys.InvalidHostKey, paramiko.SSHException, ValueError):
                continue
            if entry is None or entry.key is None or not _entry_matches(entry.hostnames, name):
                continue
            found.setdefault(entry.key.get_name(), []).append(entry.key)
    return found


def _key_label(key: Any) -> str:
    kind = str(key.get_name())
    return "ECDSA" if kind.startswith("ecdsa-") else _SSH_KEY_NAMES.get(kind, kind)


def _fingerprint(key: Any) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def check_host_key(server_key: Any, known: dict[str, list[Any]], name: str) -> None:
    """Raise :class:`_Refused` with ssh's words unless ``server_key`` is the one known for ``name``."""
    kind = server_key.get_name()
    label = _key_label(server_key)
    if kind not in known:
        raise _Refused(
            f"No {label} host key is known for {name} and you have requested strict checking.\n"
            "Host key verification failed."
        )
    if any(k.asbytes() == server_key.asbytes() for k in known[kind]):
        return
    raise _Refused(
        "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
        "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"
        "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n"
        f"The {label} key sent by the remote host is {_fingerprint(server_key)}.\n"
        f"Host key for {name} has changed and you have requested strict checking.\n"
        "Host key verification failed."
    )


def _key_type_of(algorithm: str) -> str:
    return "ssh-rsa" if algorithm in ("rsa-sha2-512", "rsa-sha2-256") else algorithm


# -- identities ----------------------------------------------------------------------


async def identity_files(settings: Settings, config: openssh.SshConfig) -> list[str]:
    """Every IdentityFile ``ssh -G`` lists (``SshConfig`` keeps only the first), ``--identity`` first."""
    files: list[str] = []
    with contextlib.suppress(OSError):  # no ssh binary: the identities already known will do
        proc = await asyncio.create_subprocess_exec(
            *openssh.base_argv(settings),
            "-G",
            settings.via or config.hostname,
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
    first = [settings.identity] if settings.identity else []
    chosen = config.options.get("identityfile")
    return list(dict.fromkeys(os.path.expanduser(p) for p in [*first, *([chosen] if chosen else []), *files]))


def _load_keys(paths: Iterable[str], notes: list[str]) -> Iterator[tuple[str, Any]]:
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            yield path, paramiko.PKey.from_path(path)
        except paramiko.PasswordRequiredException:
            notes.append(f"skipped {path}: it needs a passphrase (load it into ssh-agent)")
        except (paramiko.SSHException, OSError, ValueError) as exc:
            notes.append(f"skipped {path}: {exc}")


# -- one forwarded connection ------------------------------------------------------------


class _Relay:
    """A channel and a local socket copied both ways, one thread per direction.

    An end of file is passed on as a half close (as ssh does); the relay is
    gone once both directions are done, or at once when a write fails or
    :meth:`close` is called.
    """

    def __init__(self, chan: Any, sock: socket.socket, on_done: Callable[[_Relay], None]) -> None:
        self.chan = chan
        self.sock = sock
        self._on_done = on_done
        self._lock = threading.Lock()
        self._halves = 2
        self._closed = False

    def start(self, spawn: Callable[..., threading.Thread | None]) -> bool:
        """Start both directions; False when the session is ending and refused the threads."""
        if spawn(self._to_sock, name="wqs-paramiko-down") is None:
            self.close()
            self._finish()
            return False
        if spawn(self._to_chan, name="wqs-paramiko-up") is None:
            self.close()
            self._half_done()
        return True

    def _to_sock(self) -> None:
        try:
            while data := self.chan.recv(_BUFFER):
                self.sock.sendall(data)
            if self.chan.closed:
                self.close()
            else:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
        finally:
            self._half_done()

    def _to_chan(self) -> None:
        try:
            while data := self.sock.recv(_BUFFER):
                self.chan.sendall(data)
            self.chan.shutdown_write()
        except OSError:
            self.close()
        finally:
            self._half_done()

    def _half_done(self) -> None:
        with self._lock:
            self._halves -= 1
            last = self._halves == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        self.close()
        self.sock.close()
        self._on_done(self)

    def close(self) -> None:
        """Stop both directions (they end by themselves once woken)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            self.chan.close()


# -- the session -----------------------------------------------------------------------------


class ParamikoSession:
    """One tunnel connection made with paramiko; the same surface as :class:`OpenSSHSession`.

    Build it with :meth:`start` inside the event loop that will use it. It
    connects in the background: failures come out of :meth:`established`
    and :meth:`exited`, with ssh's words in :attr:`stderr`.
    """

    def __init__(
        self,
        settings: Settings,
        config: openssh.SshConfig,
        *,
        master_port: int | None,
        remote_port: int,
    ) -> None:
        self.pid: int | None = None  # no process: the session lives in this one
        self.remote_pid: int | None = None
        self.sock: socket.socket | None = None
        self.probe_path: str | None = None  # probes are channels, see open_probe()
        self.remote_port = remote_port
        self._settings = settings
        self._config = config
        self._master_port = master_port
        self._loop = asyncio.get_running_loop()
        self._stderr: deque[str] = deque(maxlen=60)
        self._established: asyncio.Future[None] = self._loop.create_future()
        self._established.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._pongs: dict[int, asyncio.Future[None]] = {}
        self._seq = 0
        # Shared with the threads: guarded by _lock.
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._relays: set[_Relay] = set()
        self._ending = False
        self._stopped_by: int | None = None
        self._main: threading.Thread | None = None
        self._transport: Any = None
        self._chan: Any = None
        self._authenticated = False
        self._runner = asyncio.create_task(self._connect(), name="paramiko-connect")
        self._runner.add_done_callback(self._connect_done)

    @classmethod
    async def start(
        cls,
        settings: Settings,
        config: openssh.SshConfig,
        *,
        master_port: int | None,
        remote_port: int,
    ) -> ParamikoSession:
        """Begin a session (``master_port`` None: no reverse forward, probes only)."""
        return cls(settings, config, master_port=master_port, remote_port=remote_port)

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self._exited.result()}"
        return f"<ParamikoSession {self._config.hostname}:{self._config.port} {state}>"

    # -- what the tunnel reads -------------------------------------------------------------

    @property
    def stderr(self) -> str:
        """What went wrong, in the words ssh would have used."""
        return "\n".join(self._stderr)

    @property
    def running(self) -> bool:
        """True until the connection has ended."""
        return not self._exited.done()

    @property
    def returncode(self) -> int | None:
        """The exit code once the session has ended, else None (like ``Popen.returncode``)."""
        return self._exited.result() if self._exited.done() else None

    async def established(self) -> None:
        """Wait until the remote command runs; raises :class:`SessionEnded` if the session ends first."""
        await asyncio.shield(self._established)

    async def exited(self) -> int:
        """Wait for the session to end; returns its exit code."""
        return await asyncio.shield(self._exited)

    async def ping(self) -> float:
        """One round trip through the session channel; returns its seconds (wrap it in a timeout)."""
        if not self.running:
            raise openssh.SessionEnded(self.returncode, self.stderr)
        await self.established()
        self._seq += 1
        seq = self._seq
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pongs[seq] = fut
        sent = self._loop.time()
        try:
            await self._call(self._send_line, f"wqs-ping {seq}\n".encode())
            await fut
            return self._loop.time() - sent
        finally:
            self._pongs.pop(seq, None)

    async def open_probe(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection that enters the head node's 127.0.0.1:REMOTE through this session."""
        await self.established()
        ours = await self._call(self._open_probe, discard=lambda s: s.close())
        return await asyncio.open_connection(sock=ours)

    # -- stopping ------------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        """SIGTERM, SIGKILL, SIGINT or SIGHUP end the session at once; other signals mean nothing here."""
        if sig in _ENDING_SIGNALS:
            self._stop(sig)

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
        await self._join_threads(_JOIN_TIMEOUT)
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
        transport = self._transport
        if transport is not None:
            # In the middle of its handshake a transport may not notice the
            # shutdown before its own timeouts; closing it ends that wait too.
            with contextlib.suppress(Exception):
                transport.close()

    async def _join_threads(self, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        while True:
            with self._lock:
                alive = [t for t in self._threads if t.is_alive()]
                self._threads = alive
            if not alive:
                return
            if self._loop.time() > deadline:
                get_logger().warning("paramiko.threads_left", threads=[t.name for t in alive])
                return
            await asyncio.sleep(0.005)

    # -- plumbing between the loop and the threads ---------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> threading.Thread | None:
        """Start a tracked thread; None once the session is ending."""
        with self._lock:
            if self._ending:
                return None
            self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(target=target, args=args, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        return thread

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            self._loop.call_soon_threadsafe(fn, *args)

    def _call(
        self, fn: Callable[..., T], *args: Any, discard: Callable[[T], None] | None = None
    ) -> asyncio.Future[T]:
        """Run a blocking paramiko call in a thread of its own; ``discard`` gets a result nobody awaits."""
        fut: asyncio.Future[T] = self._loop.create_future()

        def settle(result: T | None, error: BaseException | None) -> None:
            if fut.done():
                if error is None and discard is not None:
                    discard(result)  # type: ignore[arg-type]
            elif error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)  # type: ignore[arg-type]

        def run() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:
                self._post(settle, None, exc)
            else:
                self._post(settle, result, None)

        if self._spawn(run, name="wqs-paramiko-call") is None:
            fut.set_exception(openssh.SessionEnded(self.returncode, self.stderr))
        return fut

    def _say(self, text: str) -> None:
        """Add lines to stderr; deque appends are safe from any thread."""
        self._stderr.extend(text.splitlines())

    # -- the loop side ---------------------------------------------------------------------------

    async def _connect(self) -> None:
        cfg, s = self._config, self._settings
        try:
            if cfg.proxied:
                raise _Refused(
                    "Unsupported option for the paramiko backend: ProxyJump/ProxyCommand "
                    "(use backend='openssh' for this head node)"
                )
            identities = await identity_files(s, cfg)
            sock = await connection.open_connection(cfg.hostname, cfg.port, s.connect_timeout)
        except (_Refused, OSError) as exc:
            self._finish(255, str(exc))
            return
        self.sock = sock
        self._main = self._spawn(self._run, sock, identities, name="wqs-paramiko-session")

    def _connect_done(self, task: asyncio.Task[None]) -> None:
        # Also covers a close() before the task ever ran, and our own bugs.
        if self._exited.done():
            return
        if task.cancelled():
            self._finish(self._stopped_by or -signal.SIGTERM, "")
        elif (exc := task.exception()) is not None:
            get_logger().error("paramiko.connect_crashed", host=self._config.hostname, error=repr(exc))
            self._finish(255, f"paramiko backend: internal error: {exc!r}")

    def _on_line(self, line: str) -> None:
        words = line.split()
        if len(words) != 2 or not words[1].isdigit():
            return
        if words[0] == "wqs-session":
            self.remote_pid = int(words[1])
            if not self._established.done():
                self._established.set_result(None)
        elif words[0] == "wqs-ping":
            fut = self._pongs.get(int(words[1]))
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _finish(self, code: int, text: str) -> None:
        if text:
            self._say(text)
        self.sock = None
        ended = openssh.SessionEnded(code, self.stderr)
        for fut in self._pongs.values():
            if not fut.done():
                fut.set_exception(ended)
        if not self._established.done():
            self._established.set_exception(ended)
        if not self._exited.done():
            self._exited.set_result(code)

    # -- the session thread ---------------------------------------------------------------------

    def _run(self, sock: socket.socket, identities: list[str]) -> None:
        code, text = 255, ""
        try:
            self._handshake(sock, identities)
            self._read_session()
            code, text = self._why_ended()
        except _Refused as exc:
            text = str(exc)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            text = self._lost(exc)
        except Exception as exc:
            get_logger().exception("paramiko.session_crashed", host=self._config.hostname)
            text = f"paramiko backend: internal error: {exc!r}"
        finally:
            self._teardown(sock)
            if self._stopped_by is not None:
                code, text = self._stopped_by, ""
            self._post(self._finish, code, text)

    def _handshake(self, sock: socket.socket, identities: list[str]) -> None:
        s, cfg = self._settings, self._config
        name = host_key_name(cfg)
        known = known_host_keys(known_hosts_files(cfg), name)
        transport = paramiko.Transport(sock)
        transport.name = "wqs-paramiko-transport"
        self._transport = transport
        transport.set_log_channel(LOGGER_NAME)
        transport.banner_timeout = transport.handshake_timeout = transport.auth_timeout = s.connect_timeout
        options = transport.get_security_options()
        # Ask for a host key type we know, as ssh does, so a known host is not "unknown".
        algorithms = list(options.key_types)
        options.key_types = sorted(algorithms, key=lambda a: _key_type_of(a) not in known)
        if not any(k.lower() == "ciphers" for k, _ in s.ssh_options) and FAST_CIPHER in options.ciphers:
            options.ciphers = [FAST_CIPHER, *(c for c in options.ciphers if c != FAST_CIPHER)]
        with self._lock:
            self._threads.append(transport)
        if self._stopped_by is not None:
            # close() came between the connection and the handshake: do not start it.
            raise _Refused("")
        transport.start_client(timeout=s.connect_timeout)
        check_host_key(transport.get_remote_server_key(), known, name)
        self._authenticate(transport, identities)
        self._authenticated = True
        if self._master_port is not None:
            try:
                port = transport.request_port_forward(s.remote_bind, self.remote_port, handler=self._incoming)
            except paramiko.SSHException:
                if not transport.is_active():
                    raise
                raise _Refused(
                    f"Error: remote port forwarding failed for listen port {self.remote_port}"
                ) from None
            if self.remote_port == 0:
                self._say(f"Allocated port {port} for remote forward to localhost:{self._master_port}")
            self.remote_port = int(port)
        chan = transport.open_session(timeout=s.connect_timeout)
        self._chan = chan
        chan.exec_command(openssh.REMOTE_COMMAND)

    def _authenticate(self, transport: Any, identities: list[str]) -> None:
        cfg = self._config
        notes: list[str] = []
        tried: list[str] = []
        agent = None
        keys: list[tuple[str, Any]] = list(_load_keys(identities, notes))
        if (
            os.environ.get("SSH_AUTH_SOCK")
            and cfg.options.get("identitiesonly", "no") != "yes"
            and cfg.options.get("identityagent", "") != "none"
        ):
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
        notes.append(f"keys tried: {', '.join(tried) or 'none (no IdentityFile exists)'}")
        raise _Refused("\n".join([*notes, f"{cfg.user}@{cfg.hostname}: Permission denied (publickey)."]))

    def _incoming(self, chan: Any, origin: tuple[str, int], server: tuple[str, int]) -> None:
        # Called in paramiko's transport thread, which must not wait on a connect.
        if self._spawn(self._serve_forwarded, chan, name="wqs-paramiko-accept") is None:
            with contextlib.suppress(Exception):
                chan.close()

    def _serve_forwarded(self, chan: Any) -> None:
        assert self._master_port is not None
        try:
            sock = socket.create_connection(
                ("127.0.0.1", self._master_port), timeout=self._settings.connect_timeout
            )
        except OSError as exc:
            self._say(f"connect_to localhost port {self._master_port}: failed ({exc.strerror or exc}).")
            with contextlib.suppress(Exception):
                chan.close()
            return
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._relay(chan, sock)

    def _relay(self, chan: Any, sock: socket.socket) -> None:
        relay = _Relay(chan, sock, self._relay_done)
        with self._lock:
            if not self._ending:
                self._relays.add(relay)
        relay.start(self._spawn)

    def _relay_done(self, relay: _Relay) -> None:
        with self._lock:
            self._relays.discard(relay)

    def _open_probe(self) -> socket.socket:
        transport = self._transport
        if transport is None or not transport.is_active():
            raise ConnectionResetError("the ssh connection is gone")
        try:
            chan = transport.open_channel(
                "direct-tcpip",
                ("127.0.0.1", self.remote_port),
                ("127.0.0.1", 0),
                timeout=self._settings.connect_timeout,
            )
        except paramiko.ChannelException as exc:
            raise ConnectionRefusedError(
                f"the head node could not connect to 127.0.0.1:{self.remote_port}: {exc}"
            ) from None
        except paramiko.SSHException as exc:
            raise ConnectionResetError(f"the ssh connection is gone: {exc}") from None
        ours, theirs = socket.socketpair()
        self._relay(chan, theirs)
        return ours

    def _send_line(self, data: bytes) -> None:
        chan = self._chan
        if chan is None:
            raise openssh.SessionEnded(None, self.stderr)
        chan.sendall(data)

    def _read_session(self) -> None:
        chan = self._chan
        pending = b""
        while data := chan.recv(4096):
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                self._post(self._on_line, line.decode(errors="replace").strip())
        while chan.recv_stderr_ready():
            self._say(chan.recv_stderr(4096).decode(errors="replace"))

    def _why_ended(self) -> tuple[int, str]:
        chan, transport = self._chan, self._transport
        # exit_status stays -1 without an exit-status message (no status, or a signal).
        status = int(chan.exit_status)
        if status >= 0:
            return (status or 255), f"the remote command ended with status {status}"
        # A dying connection closes its channels just before it marks itself dead.
        transport.join(0.5)
        if transport.is_active():
            return 255, "the remote command ended without an exit status (killed on the head node?)"
        return 255, self._lost(transport.get_exception())

    def _lost(self, exc: BaseException | None) -> str:
        cfg = self._config
        where = f"{cfg.hostname} port {cfg.port}"
        if not self._authenticated:
            detail = "no answer" if exc is None else (str(exc) or type(exc).__name__)
            return f"kex_exchange_identification: connection to {where} failed: {detail}"
        detail = f" ({exc})" if exc is not None and str(exc) else ""
        return f"Connection to {where} closed by remote host{detail}."

    def _teardown(self, sock: socket.socket) -> None:
        with self._lock:
            self._ending = True
            relays = list(self._relays)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        for relay in relays:
            relay.close()
        transport = self._transport
        if transport is not None:
            transport.close()
            if transport.is_alive():
                transport.join(_JOIN_TIMEOUT)
        sock.close()

"""The network paths between a master and its workers, for the bulk, latency and concurrency figures.

Every path leads to one :class:`~.traffic.Server` (a sink that counts bytes,
an echo for round trips, and a ``queue_status`` answer so the supervisor
accepts it as a master) and yields the 127.0.0.1 port a client connects to:

* ``direct`` -- loopback TCP to the server, the limit of this machine;
* ``ssh -R``, ``ssh -R aes128-gcm``, ``ssh -R chacha20-poly1305`` -- the HOWTO's
  ``ssh -N -R`` to the loopback :class:`~wqsupervisor.harness.sandbox.HeadNode`, with
  the client's default cipher or one forced with ``-o Ciphers=``;
* ``two-hop`` -- the HOWTO's chain: that ``ssh -N -R`` on the campus side and a
  node's ``ssh -N -L`` to the head's remote port;
* ``paramiko`` -- the in-process backend's reverse forward
  (:class:`~wqsupervisor.paramiko_backend.ParamikoSession`);
* ``wqsupervisor`` -- the supervised tunnel, the real engine (OpenSSH backend);
* ``wqsupervisor two-hop`` -- that tunnel and the node launcher's own hop, the
  path workers on compute nodes take (compared with the HOWTO's two hops);
* ``resumable`` -- the supervised tunnel with the head relay and the agent on
  the data path (the default);
* ``resumable two-hop`` -- the resumable tunnel and a resumable node hop (the
  launcher's ``resume_hop``: a node relay and a hop daemon on the head);
* ``socat hops`` -- the plain supervised tunnel with a ``socat`` relay at each
  end (one on the head in front of the remote port, one on campus in front of
  the master): the two user-space hops any resumable design adds, written in
  C. What it costs is the floor for the relay.

The load comes from a :class:`~.traffic.Client` in a process of its own (see
:mod:`.traffic`); :class:`Bed` holds a head node, both ends and every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ...launcher import hop_argv, node_relay_argv
from ...process import owned_argv, terminate
from ...relay.headmain import NODE_UP
from ...relay.program import source
from ...wqserver import free_port
from ..sandbox import ALIAS, HeadNode
from .traffic import BLOCK, Client, Server
from .tunnels import PlainSsh, Supervised

AES_GCM = "aes128-gcm@openssh.com"
CHACHA = "chacha20-poly1305@openssh.com"


def wait_listening(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0, what: str = "ssh"
) -> None:
    """Wait until 127.0.0.1:port accepts a connection; raise if ``proc`` (``what``) dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before port {port} was open")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on port {port} after {timeout:g} s")
        time.sleep(0.02)


def start_node_hop(
    argv: Sequence[str], port: int, what: str, keep_input: bool = False
) -> subprocess.Popen[bytes]:
    """A compute node's ssh hop (``argv``), running once 127.0.0.1:``port`` accepts connections."""
    proc = subprocess.Popen(
        owned_argv(argv),
        stdin=subprocess.PIPE if keep_input else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, proc, what=what)
    except BaseException:
        stop_node_hop(proc)
        raise
    return proc


def stop_node_hop(proc: subprocess.Popen[bytes] | None) -> None:
    """End a hop started by :func:`start_node_hop` (its input first, as its session ends on a node)."""
    if proc is None:
        return
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    terminate(proc, grace=2)


class TwoHop:
    """The HOWTO's chain: ``ssh -N -R`` from the campus side, then the node's ``ssh -N -L`` to it.

    :attr:`remote_port` is the node's local port, the one its workers use.
    """

    name = "two-hop"

    def __init__(self, head: HeadNode, master_port: int, options: Sequence[str] = ()) -> None:
        self.campus = PlainSsh(head, master_port, options=options)
        self.remote_port = free_port()
        self.node: subprocess.Popen[bytes] | None = None
        try:
            argv = ["ssh", "-F", str(head.ssh_config), *options, "-o", "ExitOnForwardFailure=yes", "-N"]
            argv += ["-L", f"127.0.0.1:{self.remote_port}:127.0.0.1:{self.campus.remote_port}", ALIAS]
            self.node = start_node_hop(argv, self.remote_port, "the node's ssh -N -L")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop both hops."""
        stop_node_hop(self.node)
        self.campus.close()
        _close_stdin(self.campus)


class SupervisedTwoHop:
    """The path workers on compute nodes take: the supervised tunnel, then the node launcher's hop.

    The hop is the launcher's own ssh command line (:func:`~wqsupervisor.launcher.hop_argv`:
    a session, so that sshd sets TCP_NODELAY); :attr:`remote_port` is the node's local port.
    """

    name = "wqsupervisor two-hop"

    def __init__(self, head: HeadNode, master_port: int, **options: Any) -> None:
        self.tunnel = Supervised(head, master_port, **options)
        self.remote_port = free_port()
        self.node: subprocess.Popen[bytes] | None = None
        try:
            argv = hop_argv(ALIAS, self.remote_port, self.tunnel.remote_port, ("-F", str(head.ssh_config)))
            # The hop's remote command waits on its input, as on a node: a pipe kept open until close().
            self.node = start_node_hop(argv, self.remote_port, "the node launcher's hop", keep_input=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the hop, then the tunnel."""
        stop_node_hop(self.node)
        self.tunnel.close()


class ResumableTwoHop:
    """The compute nodes' path with both hops resumable: the resumable tunnel, then a node relay.

    The node relay is the launcher's with ``resume_hop`` (:func:`~wqsupervisor.launcher.node_relay_argv`):
    on the node it holds the connection and runs the hop's ssh, whose session runs a hop daemon on
    the head that connects to the tunnel's port. :attr:`remote_port` is the node relay's port.
    """

    name = "resumable two-hop"

    def __init__(self, head: HeadNode, master_port: int) -> None:
        self.tunnel = Supervised(head, master_port, backend="resumable")
        self.node: subprocess.Popen[bytes] | None = None
        try:
            argv = node_relay_argv([ALIAS], self.tunnel.remote_port, ("-F", str(head.ssh_config)))
            self.node = subprocess.Popen(
                owned_argv(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
            )
            assert self.node.stdin is not None and self.node.stdout is not None
            self.node.stdin.write(source())
            self.node.stdin.close()
            words = self.node.stdout.readline().split()
            if len(words) != 2 or words[0].decode() != NODE_UP:
                raise RuntimeError(f"the node relay did not start: {b' '.join(words)!r}")
            self.remote_port = int(words[1])
            wait_listening(self.remote_port, self.node, what="the node relay")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the node relay (it ends its hop daemon), then the tunnel."""
        if self.node is not None:
            terminate(self.node, grace=5)
            if self.node.stdout is not None:
                self.node.stdout.close()
            self.node = None
        self.tunnel.close()


SOCAT_BUFFER = 256 * 1024


class SocatHops:
    """The plain supervised tunnel between two ``socat`` relays (TCP_NODELAY both ways), one per end.

    With 256 KiB buffers (``-b``, 8 KiB by default), as large as the relay's
    reads: the floor is two hops in C, not a small buffer's many wake-ups.
    """

    name = "socat hops"

    def __init__(self, head: HeadNode, master_port: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tunnel: Supervised | None = None
        try:
            campus = self._relay(master_port)
            self.tunnel = Supervised(head, campus)
            self.remote_port = self._relay(self.tunnel.remote_port)
        except BaseException:
            self.close()
            raise

    def _relay(self, to: int) -> int:
        port = free_port()
        listen = f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,nodelay"
        argv = ["socat", "-b", str(SOCAT_BUFFER), listen, f"TCP:127.0.0.1:{to},nodelay"]
        self.procs.append(start_node_hop(argv, port, "socat"))
        return port

    def close(self) -> None:
        """Stop both relays and the tunnel."""
        for proc in self.procs:
            terminate(proc, grace=2)
        if self.tunnel is not None:
            self.tunnel.close()


class ParamikoTunnel:
    """The in-process paramiko backend's reverse forward, on an event loop of its own thread."""

    name = "paramiko"

    def __init__(self, head: HeadNode, master_port: int) -> None:
        self.remote_port = free_port()
        self._session: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wqs-bench-paramiko", daemon=True)
        self._thread.start()
        try:
            settings = head.settings(remote_port=self.remote_port, backend="paramiko")
            self._session = self._call(self._start(settings, master_port), timeout=60)
            wait_listening(self.remote_port)
        except BaseException:
            self.close()
            raise

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self, settings: Any, master_port: int) -> Any:
        from ...backends import sessions_for

        sessions = sessions_for(settings)
        await sessions.prepare(tempfile.gettempdir(), f"bench-{self.remote_port}")
        session = await sessions.start(master_port=master_port, remote_port=self.remote_port, probes=None)
        try:
            await asyncio.wait_for(session.established(), 30)
        except BaseException:
            await session.close()
            raise
        return session

    def close(self) -> None:
        """End the session and its loop."""
        if self._session is not None:
            with contextlib.suppress(Exception):
                self._call(self._session.close(), timeout=10)
            self._session = None
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()


def first_cipher(ssh_g_output: str) -> str:
    """The client's first cipher, as ``ssh -G`` prints it: the one a default server agrees to."""
    for line in ssh_g_output.splitlines():
        key, _, value = line.strip().partition(" ")
        if key.lower() == "ciphers" and value:
            return value.split(",")[0]
    return "unknown"


def default_cipher(head: HeadNode) -> str:
    """The cipher a plain ``ssh`` to the head node ends up with."""
    res = subprocess.run(
        ["ssh", "-F", str(head.ssh_config), "-G", ALIAS],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return first_cipher(res.stdout)


Opener = Callable[[HeadNode, int], contextlib.AbstractContextManager[int]]


@contextlib.contextmanager
def _direct(_head: HeadNode, port: int) -> Iterator[int]:
    yield port


def _close_stdin(tool: Any) -> None:
    """Close the stdin pipe :class:`PlainSsh` keeps to its ssh (its close() only ends the process)."""
    proc = getattr(tool, "proc", None)
    if proc is not None and proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()


def _closing(make: Callable[[HeadNode, int], Any]) -> Opener:
    @contextlib.contextmanager
    def opener(head: HeadNode, port: int) -> Iterator[int]:
        path = make(head, port)
        try:
            yield int(path.remote_port)
        finally:
            path.close()
            _close_stdin(path)

    return opener


def _ssh_r(cipher: str | None) -> Opener:
    options = ["-o", f"Ciphers={cipher}"] if cipher else []
    return _closing(lambda head, port: PlainSsh(head, port, options=options))


@dataclass(frozen=True)
class PathSpec:
    """One way from a client to the server: how to open it, and what to divide its figures by."""

    key: str
    label: str
    open: Opener
    comparators: tuple[str, ...] = ()


PATHS: dict[str, PathSpec] = {
    spec.key: spec
    for spec in (
        PathSpec("direct", "direct loopback TCP (the limit)", _direct),
        PathSpec("ssh -R", "ssh -N -R, default cipher", _ssh_r(None), ("direct",)),
        PathSpec("ssh -R aes128-gcm", "ssh -N -R, -o Ciphers=aes128-gcm", _ssh_r(AES_GCM), ("direct",)),
        PathSpec("ssh -R chacha20", "ssh -N -R, -o Ciphers=chacha20-poly1305", _ssh_r(CHACHA), ("direct",)),
        PathSpec(
            "two-hop",
            "two-hop: ssh -N -R + node ssh -N -L",
            _closing(TwoHop),
            ("direct", "ssh -R"),
        ),
        PathSpec(
            "paramiko",
            "paramiko backend, in-process (prefers aes128-gcm)",
            _closing(ParamikoTunnel),
            ("direct", "ssh -R aes128-gcm"),
        ),
        PathSpec(
            "wqsupervisor",
            "wqsupervisor, plain forwarding (OpenSSH, prefers aes128-gcm, --no-resume)",
            _closing(Supervised),
            # Against ssh as users run it, and against ssh with the cipher we pick (what the tunnel adds).
            ("direct", "ssh -R", "ssh -R aes128-gcm"),
        ),
        PathSpec(
            "wqsupervisor two-hop",
            "wqsupervisor + node launcher's hop (the compute nodes' path)",
            _closing(SupervisedTwoHop),
            ("direct", "two-hop"),
        ),
        PathSpec(
            "resumable",
            "wqsupervisor, resumable (the default: head relay on the data path)",
            _closing(lambda head, port: Supervised(head, port, backend="resumable")),
            ("direct", "wqsupervisor", "socat hops"),
        ),
        PathSpec(
            "resumable two-hop",
            "resumable tunnel + resumable node hop (--resume-hop: a node relay and a hop daemon)",
            _closing(ResumableTwoHop),
            ("direct", "wqsupervisor two-hop"),
        ),
        PathSpec(
            "socat hops",
            "plain tunnel + a socat relay at each end (two user-space hops in C: the relay's floor)",
            _closing(SocatHops),
            ("direct", "wqsupervisor"),
        ),
    )
}
# Many workers share one ssh connection: the paths that carry them all in one.
CONCURRENT_PATHS = ("direct", "ssh -R", "wqsupervisor", "resumable")


class Bed:
    """A head node, the server, the client, and every path opened on first use; closes them all."""

    def __init__(self, progress: Callable[[str], None] = lambda _text: None) -> None:
        self._stack = contextlib.ExitStack()
        self._ports: dict[str, int] = {}
        self._progress = progress
        try:
            self.head = self._stack.enter_context(HeadNode())
            self.server = Server()
            self._stack.callback(self.server.close)
            self.client = Client()
            self._stack.callback(self.client.close)
            self.default_cipher = default_cipher(self.head)
        except BaseException:
            self._stack.close()
            raise

    def port(self, key: str) -> int:
        """The port a client uses for path ``key`` (opened now if it is not open yet)."""
        if key not in self._ports:
            started = time.monotonic()
            port = self._stack.enter_context(PATHS[key].open(self.head, self.server.port))
            # One untimed push first: a new connection's windows have yet to grow.
            self.client.bulk(port, 8 * BLOCK)
            self._ports[key] = port
            self._progress(f"opened path {key} in {time.monotonic() - started:.1f} s")
        return self._ports[key]

    def close(self) -> None:
        """Close every path, the client, the server and the head node."""
        self._stack.close()

    def __enter__(self) -> Bed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The relay without ssh: its streams over a carrier that is cut, and the real head program over pipes.

The pure tests drive two :class:`~wqsupervisor.relay.core.Mux` ends through
an in-memory carrier that loses whatever is in flight at each cut. The
process tests run the very program a session sends to the head node (with
``sh -c`` instead of ssh), attach the agent's :class:`RelayPeer` to its
stdin/stdout, and talk through it to a real TCP server as workers would.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import os
import random
import signal
import socket
import struct
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from wqsupervisor.relay import program
from wqsupervisor.relay.core import WINDOW, Mux
from wqsupervisor.relay.peer import Carrier, RelayPeer
from wqsupervisor.relay.wire import DATA, Decoder, WireError, encode

from support import free_port, listening, relay_pids, wait_for

# -- the streams alone -------------------------------------------------------------------------


def _payload(sid: int, side: str, size: int) -> bytes:
    return random.Random(f"{sid}-{side}").randbytes(size)


class _End:
    """One mux end with its local sockets simulated: each stream sends its payload, then ends."""

    def __init__(self, mux: Mux, side: str, sizes: dict[int, int], rng: random.Random, slow: bool = False):
        self.mux, self.side, self.sizes, self.rng, self.slow = mux, side, sizes, rng, slow
        self.outgoing: dict[int, bytes] = {}
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.untaken: dict[int, int] = defaultdict(int)
        self.ended: set[int] = set()
        self.fin_pending: set[int] = set()
        self.closed: set[int] = set()
        self.peak_buffer = 0

    def start(self, sid: int) -> None:
        self.outgoing[sid] = _payload(sid, self.side, self.sizes[sid])

    def step(self) -> None:
        for sid, data in list(self.outgoing.items()):
            if sid not in self.mux.streams:
                continue
            n = min(self.mux.room(sid), len(data), self.rng.randint(1, 200_000))
            if n:
                self.mux.local_data(sid, data[:n])
                self.outgoing[sid] = data = data[n:]
            if not data and sid not in self.ended:
                self.ended.add(sid)
                self.mux.local_eof(sid)
        self.peak_buffer = max(
            self.peak_buffer, max((s.buffered for s in self.mux.streams.values()), default=0)
        )
        events, self.mux.events = self.mux.events, []
        for kind, sid, data in events:
            if kind == "open":
                self.start(sid)
            elif kind == "data":
                self.received[sid] += data
                self.untaken[sid] += len(data)
            elif kind == "eof":
                self.fin_pending.add(sid)
            elif kind == "close":
                self.closed.add(sid)
        for sid in set(self.untaken) | self.fin_pending:
            n = self.untaken[sid]
            take = n if not self.slow else min(n, self.rng.randint(0, 4096))
            if take:
                self.mux.taken(sid, take)
                self.untaken[sid] -= take
            if self.untaken[sid] == 0 and sid in self.fin_pending:
                self.fin_pending.discard(sid)
                self.mux.took_fin(sid)


def _run_cut_carrier(
    seed: int, *, streams: int, size: int, cut_every: int, slow: bool = False
) -> tuple[_End, _End]:
    rng = random.Random(seed)
    head, agent = Mux(opener=True), Mux(opener=False)
    sizes = {sid: rng.randint(0, size) for sid in range(1, streams + 1)}
    h = _End(head, "head", sizes, rng, slow)
    a = _End(agent, "agent", sizes, rng, slow)
    for _ in range(streams):
        h.start(head.open())
    head.attach()
    agent.attach()
    flights: dict[str, list[bytes]] = {"up": [], "down": []}
    cuts = 0
    for step in range(200_000):
        h.step()
        a.step()
        for mux in (head, agent):
            # The I/O layer's timer: owed acks go alone after a while.
            if step % 5 == 4 and mux.owes_acks():
                mux.flush_acks()
        if head.wants_output():
            flights["up"].append(head.output(rng.randint(1, 300_000)))
        if agent.wants_output():
            flights["down"].append(agent.output(rng.randint(1, 300_000)))
        for name, mux in (("up", agent), ("down", head)):
            if flights[name]:
                chunk = flights[name].pop(0)
                cut_at = rng.randint(0, len(chunk))
                mux.feed(chunk[:cut_at], lambda *_: None)
                if cut_at < len(chunk):
                    flights[name].insert(0, chunk[cut_at:])
        if cut_every and step % cut_every == cut_every - 1:
            cuts += 1
            flights = {"up": [], "down": []}
            for mux in (head, agent):
                mux.detach()
            head.attach()
            agent.attach()
        if not head.streams and not agent.streams and len(h.closed) == len(a.closed) == streams:
            break
    assert cuts >= (1 if cut_every else 0)
    return h, a


def _check_delivered(h: _End, a: _End, streams: int) -> None:
    for sid in range(1, streams + 1):
        up = hashlib.sha256(_payload(sid, "head", h.sizes[sid])).hexdigest()
        down = hashlib.sha256(_payload(sid, "agent", a.sizes[sid])).hexdigest()
        assert hashlib.sha256(a.received[sid]).hexdigest() == up, f"stream {sid} upstream"
        assert hashlib.sha256(h.received[sid]).hexdigest() == down, f"stream {sid} downstream"
    assert h.closed == a.closed == set(range(1, streams + 1))
    assert not h.mux.streams and not a.mux.streams


def test_streams_carry_every_byte_once_without_cuts():
    """Twelve streams both ways over a carrier that splits frames anywhere: same bytes, all closed."""
    h, a = _run_cut_carrier(1, streams=12, size=400_000, cut_every=0)
    _check_delivered(h, a, 12)


@pytest.mark.parametrize("seed", [2, 3, 4, 5])
def test_cut_carriers_with_data_in_flight_lose_and_duplicate_nothing(seed):
    """The carrier is cut every few steps with frames in flight both ways; checksums still match."""
    h, a = _run_cut_carrier(seed, streams=8, size=2_000_000, cut_every=7)
    _check_delivered(h, a, 8)


def test_a_slow_reader_holds_its_sender_to_the_window():
    """A receiver that takes its bytes slowly keeps the sender's replay buffer within WINDOW."""
    h, a = _run_cut_carrier(6, streams=3, size=3 * WINDOW, cut_every=11, slow=True)
    _check_delivered(h, a, 3)
    assert 0 < h.peak_buffer <= WINDOW and 0 < a.peak_buffer <= WINDOW


def test_a_gap_in_the_stream_is_refused():
    """Bytes that skip ahead of what was received are an error, not silently accepted."""
    agent = Mux(opener=False)
    agent.attach()
    agent.feed(encode(DATA, 1, 0, b"abc"), lambda *_: None)
    with pytest.raises(WireError):
        agent.feed(encode(DATA, 1, 10, b"xyz"), lambda *_: None)
    with pytest.raises(WireError):
        Decoder().feed(struct.pack("!BIQI", 77, 0, 0, 0))


def test_frames_cut_anywhere_decode_to_the_same_bytes():
    """Frames fed in random cuts (down to single bytes) give every control frame whole and each
    stream's DATA bytes contiguous and complete, a piece as soon as it arrives."""
    rng = random.Random(7)
    sent: dict[int, bytes] = {1: rng.randbytes(700_000), 2: b"", 3: rng.randbytes(5)}
    wire = bytearray(encode(4, 0, 0, b"hello agent"))
    for sid, data in sent.items():
        for start in range(0, max(len(data), 1), 250_000):
            wire += encode(DATA, sid, start, data[start : start + 250_000])
        wire += encode(6, 0, sid, b"")
    for cuts in (1, 17, 4096):
        decoder, pos = Decoder(), 0
        got: dict[int, bytearray] = defaultdict(bytearray)
        controls = []
        while pos < len(wire):
            step = rng.randint(1, cuts) if cuts > 1 else 1
            if cuts == 4096 and rng.random() < 0.3:
                step = rng.randint(1, 300_000)
            for kind, sid, value, payload in decoder.feed(bytes(wire[pos : pos + step])):
                if kind == DATA:
                    assert value == len(got[sid])
                    got[sid] += payload
                else:
                    controls.append((kind, value, bytes(payload)))
            pos += step
        assert {sid: bytes(b) for sid, b in got.items() if b} == {s: d for s, d in sent.items() if d}
        assert controls == [(4, 0, b"hello agent"), (6, 1, b""), (6, 2, b""), (6, 3, b"")]


def test_the_head_program_parses_as_python_3_6():
    """The program sent to the head node is valid Python 3.6 (and stays standard-library only)."""
    program.check_syntax((3, 6))
    tree = ast.parse(program.source())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {
        "contextlib",
        "collections",
        "errno",
        "fcntl",
        "hashlib",
        "itertools",
        "os",
        "selectors",
        "signal",
        "socket",
        "struct",
        "sys",
        "time",
        "typing",
        "shlex",
        "subprocess",
        "ctypes",
    }, imported


# -- the real head program, over pipes -----------------------------------------------------------


# The oldest Python the head relay promises (RHEL 8's), when this machine has one.
_PYTHON36 = "/root/.pyenv/versions/3.6.15/bin/python3.6"
_PYTHONS = ["python3"] + ([_PYTHON36] if os.path.exists(_PYTHON36) else [])


class _Master:
    """A TCP server speaking a checksum protocol: ``N\\n`` then data up to EOF; answers N pattern bytes, then the digest."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def __aenter__(self) -> _Master:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            n = int((await reader.readline()).decode())

            async def send() -> None:
                data = _pattern(n)
                for i in range(0, n, 50_000):
                    writer.write(data[i : i + 50_000])
                    await writer.drain()

            sender = asyncio.create_task(send())
            digest = hashlib.sha256()
            while chunk := await reader.read(65536):
                digest.update(chunk)
            await sender
            writer.write(digest.hexdigest().encode())
            await writer.drain()
        finally:
            writer.close()


def _pattern(n: int) -> bytes:
    return random.Random(n).randbytes(n)


async def _worker(port: int, up: int, down: int, started: asyncio.Event | None = None) -> None:
    """One client: sends ``up`` bytes, expects ``down`` pattern bytes and the digest of what it sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = random.Random(up + 7).randbytes(up)
    writer.write(f"{down}\n".encode())

    async def send() -> None:
        for i in range(0, up, 50_000):
            writer.write(data[i : i + 50_000])
            await writer.drain()
            if started is not None and i >= up // 3:
                started.set()
        writer.write_eof()

    sender = asyncio.create_task(send())
    got = await reader.read()
    await sender
    writer.close()
    assert len(got) == down + 64, (len(got), down)
    assert got[:down] == _pattern(down), "the master's bytes arrived changed"
    assert got[down:].decode() == hashlib.sha256(data).hexdigest(), "the master got other bytes than sent"


class _Head:
    """The head program started as a session would start it, with ``sh -c`` for ssh."""

    def __init__(self, home: str, port: int, linger: float, python: str = "python3") -> None:
        self.home, self.port, self.linger, self.python = home, port, linger, python
        self.proc: asyncio.subprocess.Process | None = None

    async def session(self, peer: RelayPeer) -> str:
        """Start one 'session' on pipes, as sshd would, and attach ``peer`` through it; returns fresh or resumed."""
        env = {**os.environ, "HOME": self.home}
        to_head, head_in = os.pipe()
        head_out, from_head = os.pipe()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                "sh",
                "-c",
                program.remote_command(self.python, "127.0.0.1", self.port, self.linger),
                stdin=to_head,
                stdout=from_head,
                env=env,
            )
        finally:
            os.close(to_head)
            os.close(from_head)
        self.carrier = await Carrier.open(peer, head_out, head_in)
        self.carrier.write(program.source())
        greeting = await asyncio.wait_for(self.carrier.greeting, 10)
        assert greeting.split()[0] == "wqs-session"
        return await asyncio.wait_for(peer.attach(self.carrier), 10)

    async def cut(self) -> None:
        """The session dies mid-flight, as when ssh dies: its pipes close and its process is killed."""
        assert self.proc is not None
        self.carrier.close()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def end(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.cut()


@contextlib.asynccontextmanager
async def _relay(
    tmp_path: Any, linger: float = 30.0, python: str = "python3"
) -> AsyncIterator[tuple[_Master, _Head, RelayPeer]]:
    async with _Master() as master:
        head = _Head(str(tmp_path), free_port(), linger, python)
        peer = RelayPeer("127.0.0.1", master.port)
        try:
            yield master, head, peer
        finally:
            with contextlib.suppress(Exception):
                await peer.shutdown(2)
            await peer.close()
            await head.end()
            for pid in relay_pids(head.port):
                os.kill(pid, signal.SIGKILL)


def _run(body: Callable[[], Any]) -> None:
    asyncio.run(asyncio.wait_for(body(), 60))


def test_login_nodes_that_share_a_home_keep_their_relays_apart(tmp_path):
    """The relay's socket lives in the home directory, which login nodes often share: another host (here
    another network namespace, as the lab's second head is) names its socket differently, so one head's
    relay never attaches to nor unlinks the other's. The same host names it the same every time."""
    import subprocess
    import sys

    code = "from wqsupervisor.relay.headmain import socket_path; print(socket_path('127.0.0.1', 10001))"
    env = {**os.environ, "HOME": str(tmp_path)}

    def path(*prefix: str) -> str:
        done = subprocess.run([*prefix, sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    here, again, elsewhere = path(), path(), path("unshare", "--net")
    assert here == again
    assert here != elsewhere
    assert os.path.dirname(here) == os.path.dirname(elsewhere) == str(tmp_path / ".wqsupervisor" / "relay")
    assert here.endswith("-10001.sock") and len(here.encode()) <= 107


@pytest.mark.parametrize("python", _PYTHONS, ids=lambda p: "py36" if p == _PYTHON36 else "python3")
def test_relay_forwards_both_ways_and_shutdown_ends_it(tmp_path, python):
    """Through the real head program: 6 connections both ways intact; shutdown closes the port and the daemon."""

    async def body() -> None:
        async with _relay(tmp_path, python=python) as (master, head, peer):
            assert await head.session(peer) == "fresh"
            assert 0 < await asyncio.wait_for(peer.ping(), 5) < 1
            await asyncio.gather(*(_worker(head.port, 100_000 * i, 70_000 * i) for i in range(6)))
            assert master.connections == 6
            mode = os.stat(tmp_path / ".wqsupervisor" / "relay").st_mode & 0o777
            assert mode == 0o700
            assert relay_pids(head.port)
            assert await peer.shutdown(3)
            await asyncio.to_thread(
                wait_for, lambda: not listening(head.port), 5, "the relay's port to close"
            )

    _run(body)


@pytest.mark.parametrize("python", _PYTHONS, ids=lambda p: "py36" if p == _PYTHON36 else "python3")
def test_cut_carrier_mid_transfer_resumes_every_connection(tmp_path, python):
    """Two SIGKILLed carriers (head relay on `python`) while 4 connections move 8 MB each way: all bytes arrive, once, on the same connections."""

    async def body() -> None:
        async with _relay(tmp_path, python=python) as (master, head, peer):
            assert await head.session(peer) == "fresh"
            started = asyncio.Event()
            flows = [asyncio.create_task(_worker(head.port, 8_000_000, 8_000_000, started)) for _ in range(4)]
            await asyncio.wait_for(started.wait(), 10)
            for _ in range(2):
                assert not all(f.done() for f in flows), "the cut came after the transfer"
                await head.cut()
                await asyncio.sleep(0.3)
                assert await head.session(peer) == "resumed"
            await asyncio.gather(*flows)
            assert master.connections == 4, "a connection to the master was made again"
            assert peer.stats().resumptions == 2

    _run(body)


def test_silent_strangers_never_reach_the_master(tmp_path):
    """A connection to the head's port reaches the master only once it has spoken (workers speak first)."""

    async def body() -> None:
        async with _relay(tmp_path) as (master, head, peer):
            await head.session(peer)
            _, silent = await asyncio.open_connection("127.0.0.1", head.port)
            _, gone = await asyncio.open_connection("127.0.0.1", head.port)
            gone.close()
            await _worker(head.port, 1000, 1000)
            await asyncio.sleep(0.5)
            assert master.connections == 1, "a connection that said nothing reached the master"
            assert peer.stats().connections == 1, "the silent one is held, the closed one forgotten"
            silent.close()

    _run(body)


def test_another_agent_is_refused_while_this_one_lives_and_takes_over_once_it_went_silent(tmp_path):
    """A second supervisor's session gets REFUSED naming the first; the first's connections carry on."""
    from wqsupervisor.relay.peer import RelayRefused

    async def body() -> None:
        async with _relay(tmp_path) as (master, head, peer):
            peer.keepalive = 0.5  # silent for 3 x 0.5 + 5 s: gone
            assert await head.session(peer) == "fresh"
            first = head.carrier
            reader, writer = await asyncio.open_connection("127.0.0.1", head.port)
            writer.write(b"5\n")
            await asyncio.to_thread(wait_for, lambda: master.connections == 1, 5, "the master connection")
            other = RelayPeer("127.0.0.1", master.port)
            second = _Head(head.home, head.port, head.linger)
            with pytest.raises(RelayRefused) as refused:
                await second.session(other)
            assert f" {os.getpid()} " in refused.value.owner, refused.value.owner
            await second.end()
            assert await asyncio.wait_for(peer.ping(), 5) < 1, "the first supervisor's carrier still works"
            assert head.carrier is first
            await asyncio.sleep(7)  # the first agent says nothing (no ping) for longer than its silence
            try:
                assert await second.session(other) == "fresh"
                # The old connection ends (after the 5 bytes the master sent it, if not read yet).
                assert len(await asyncio.wait_for(reader.read(), 10)) <= 5
            finally:
                await other.shutdown(2)
                await second.end()
            writer.close()

    _run(body)


def test_relay_ends_itself_after_the_linger_closing_its_workers(tmp_path):
    """No carrier for relay_linger: the daemon closes its workers' connections, its port and its socket, and exits."""

    async def body() -> None:
        async with _relay(tmp_path, linger=1.5) as (_master, head, peer):
            await head.session(peer)
            pids = relay_pids(head.port)
            assert pids
            reader, writer = await asyncio.open_connection("127.0.0.1", head.port)
            writer.write(b"0\n")
            await head.cut()
            await peer.close()
            assert await asyncio.wait_for(reader.read(), 10) == b"", "the worker's connection was closed"
            writer.close()
            await asyncio.to_thread(wait_for, lambda: not listening(head.port), 5, "the port to close")
            await asyncio.to_thread(
                wait_for, lambda: not set(pids) & set(relay_pids(head.port)), 5, "the daemon to exit"
            )
            assert not list((tmp_path / ".wqsupervisor" / "relay").iterdir())

    _run(body)


def test_a_new_agent_gets_a_fresh_relay_state(tmp_path):
    """Another agent (new epoch) attaching ends the old connections instead of mixing them up."""

    async def body() -> None:
        async with _relay(tmp_path) as (master, head, peer):
            await head.session(peer)
            reader, writer = await asyncio.open_connection("127.0.0.1", head.port)
            writer.write(b"0\n")
            await asyncio.to_thread(wait_for, lambda: master.connections == 1, 5, "the master connection")
            await head.cut()
            other = RelayPeer("127.0.0.1", master.port)
            try:
                assert await head.session(other) == "fresh"
                assert await asyncio.wait_for(reader.read(), 10) == b""
                await _worker(head.port, 1000, 1000)
            finally:
                await other.shutdown(2)
            writer.close()

    _run(body)


def test_a_port_in_use_is_reported_in_ssh_words(tmp_path):
    """The relay cannot bind a taken port: the session ends with ssh's 'remote port forwarding failed' line."""

    async def body() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            proc = await asyncio.create_subprocess_exec(
                "sh",
                "-c",
                program.remote_command("python3", "127.0.0.1", port, 5),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "HOME": str(tmp_path)},
            )
            _out, err = await proc.communicate(program.source())
            assert proc.returncode == 1
            assert f"remote port forwarding failed for listen port {port}" in err.decode()

    _run(body)


def test_port_holders_never_take_our_relay_for_stale_or_foreign():
    """The head's holder list: our relay is neither a stale session to end nor another program."""
    from wqsupervisor.remoteport import parse_holders

    both = parse_holders("me 1000\nbound\nholder 10 1000 sshd\nholder 11 1000 wqs-relay\n")
    assert both.stale_candidates(set()) == [10]
    assert both.relays() == [11]
    relay = parse_holders("me 1000\nbound\nholder 11 1000 wqs-relay\n")
    assert relay.stale_candidates(set()) == []
    assert relay.relays() == [11]
    theirs = parse_holders("me 1000\nbound\nholder 11 1001 wqs-relay\n")
    assert theirs.relays() == []
    assert theirs.stale_candidates(set()) == []


def test_the_relay_reads_in_one_status_line():
    """status and the live view describe the relay by what it holds and its takeovers."""
    from wqsupervisor.protocol.snapshot import RelaySnapshot, TunnelSnapshot

    relay = RelaySnapshot(connections=3, buffered=4096, resumptions=2, last_took=0.754)
    assert (
        relay.describe()
        == "relay holds 3 connections, 4096 bytes buffered; resumed 2 times, last took 0.75 s"
    )
    again = TunnelSnapshot.from_dict(TunnelSnapshot(relay=relay, resume_off=None).to_dict())
    assert again.relay == relay

"""The engine's control protocol: every message round-trips, the snapshot is typed, one client talks to a real engine."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from wqsupervisor.backends import tunnel_for
from wqsupervisor.clock import SystemClock
from wqsupervisor.config import Settings
from wqsupervisor.errors import ConfigError, ProtocolError, WQSupervisorError
from wqsupervisor.events import JobsSubmitted, TunnelFailed, TunnelUp
from wqsupervisor.lifecycle import TunnelState
from wqsupervisor.logs import register_secret
from wqsupervisor.master import MasterInfo, MasterStats
from wqsupervisor.protocol import (
    Ack,
    Adapt,
    Attach,
    Attached,
    Detach,
    EngineClient,
    ErrorReply,
    EventMessage,
    GetSnapshot,
    JobsSnapshot,
    MasterSnapshot,
    MasterSummary,
    Ping,
    ReportStats,
    SnapshotReply,
    Submitted,
    SupervisorSnapshot,
    TasksSnapshot,
    TcpSnapshot,
    TunnelSnapshot,
    WorkersSnapshot,
    decode_message,
    decode_request,
    encode,
)
from wqsupervisor.runapp import EngineThread

from support import wait_for

FULL = SupervisorSnapshot(
    version="1.2.3",
    pid=4242,
    started=1_700_000_000.0,
    masters=(
        MasterSnapshot(
            id="m2",
            master=MasterSummary(port=9123, name="demo", pid=4242, reply_timeout=30),
            tunnel=TunnelSnapshot(
                label="headnode:9001",
                via="headnode",
                remote_port=9001,
                master_port=9123,
                state=TunnelState.STALLED,
                since=1_700_000_100.0,
                restarts=3,
                stalls=2,
                resumes=1,
                reclaims=1,
                last_error="ssh exited with status 255",
                rtt_ms=12.5,
                verified_by="status",
                ssh_pid=111,
                remote_pid=222,
                recoveries=(1.5, 0.25),
                socket="owned",
                rto_capped=True,
                resume_grace=2.0,
                tcp=TcpSnapshot(rtt_ms=0.5, retransmits=1, unacked=2, rto_ms=200.0),
            ),
            workers=WorkersSnapshot(connected=4, idle=1, busy=3, peak=5),
            tasks=TasksSnapshot(waiting=7, running=3, on_workers=3, done=12, submitted=22),
            stats_age=0.5,
            jobs=JobsSnapshot(system="slurm", workdir="/home/u/.wqs", pending=2, running=1, submitted=3),
        ),
    ),
    finished=(
        MasterSnapshot(
            id="m1",
            master=MasterSummary(port=9124),
            tunnel=TunnelSnapshot(label="headnode:9002", state=TunnelState.CLOSED),
        ),
    ),
    events=(
        TunnelUp(at=1_700_000_050.0, source="headnode:9001", remote_port=9001, took=0.5),
        JobsSubmitted(at=1_700_000_060.0, source="workers:slurm", system="slurm", count=2, ids=("1", "2")),
    ),
)

REQUESTS = [
    Attach(
        master=MasterInfo(port=9123, name="demo", pid=7), settings=Settings(via="headnode", remote_port=9001)
    ),
    Detach("m1"),
    GetSnapshot(),
    ReportStats("m1", MasterStats(workers_connected=2, tasks_done=5)),
    Submitted("m1", outstanding=20),
    Adapt("m1", minimum=1, maximum=None),
    Ping(),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: r.op)
def test_every_request_round_trips(request_):
    """Each request decodes from its encoded line to an equal request."""
    line = encode(request_)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_request(line) == request_


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{ not json", "not JSON"),
        (b"[1, 2]", "not JSON"),
        (b'{"op": "launch"}', "unknown op 'launch'"),
        (b"{}", "unknown op None"),
        (b'{"op": "attach", "settings": {}}', "bad request: 'master'"),
        (b'{"op": "stats", "id": "m1"}', "bad request: 'stats'"),
        (b'{"op": "adapt"}', "bad request: 'id'"),
        (b'{"op": "submitted", "id": "m1"}', "bad request: 'outstanding'"),
    ],
)
def test_a_bad_request_says_what_is_wrong(line, message):
    """Lines that are not a request raise ProtocolError with the message the engine replies with."""
    with pytest.raises(ProtocolError) as info:
        decode_request(line)
    assert info.value.message == message


def test_attach_with_bad_settings_raises_their_config_error():
    """Settings that do not validate raise ConfigError with its hint, which the engine passes on."""
    with pytest.raises(ConfigError) as info:
        decode_request(b'{"op": "attach", "master": {"port": 1}, "settings": {"via": "h", "workers": "lsf"}}')
    assert info.value.message == "unknown worker system 'lsf'"
    assert info.value.hint is not None and "slurm" in info.value.hint


@pytest.mark.parametrize(
    "message",
    [
        Attached(id="m1", remote_port=10001),
        Attached(id="m1"),
        Ack("detach"),
        Ack("ping"),
        SnapshotReply(FULL),
        ErrorReply("this supervisor starts no workers", "pass workers='slurm'"),
        ErrorReply("not JSON"),
        EventMessage(
            TunnelFailed(at=1.0, source="h:1", error="auth", hint="check the key"), TunnelState.FAILED
        ),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_reply_and_event_round_trips(message):
    """Each reply and pushed event decodes from its encoded line to an equal message."""
    assert decode_message(encode(message)) == message


@pytest.mark.parametrize(
    "line",
    [
        b"{ not json",
        b"[]",
        b'{"hello": 1}',
        b'{"type": "event", "data": {"event": "no.such"}}',
        b'{"reply": "attach"}',
    ],
)
def test_unreadable_lines_are_skipped(line):
    """A line a handle cannot read decodes to None, and is skipped as before."""
    assert decode_message(line) is None


def test_the_snapshot_round_trips_through_json():
    """A full snapshot, with jobs, TCP figures and events, survives to_json/from_json unchanged."""
    assert SupervisorSnapshot.from_json(FULL.to_json()) == FULL
    data = FULL.to_dict()
    assert data["masters"][0]["tunnel"]["state"] == "stalled"
    assert json.loads(FULL.to_json())["events"][1]["ids"] == ["1", "2"]
    assert "jobs" in data["masters"][0] and "jobs" not in data["finished"][0]


def test_from_dict_drops_what_it_does_not_know():
    """Keys and event kinds of a newer engine are dropped, not fatal; missing counters read as 0."""
    data = FULL.to_dict()
    data["flavour"] = "new"
    data["masters"][0]["tunnel"]["quic"] = True
    data["events"].append({"event": "tunnel.teleported", "at": 1.0, "source": "x"})
    del data["masters"][0]["workers"]["peak"]
    snap = SupervisorSnapshot.from_dict(data)
    assert snap.masters[0].tunnel == FULL.masters[0].tunnel
    assert snap.events == FULL.events
    assert snap.masters[0].workers.peak == 0


def test_jobs_count_by_state():
    """JobsSnapshot.count reads each job state, and refuses a name that is not one."""
    jobs = JobsSnapshot(pending=2, running=1, done=5, failed=1, cancelled=4)
    assert [jobs.count(s) for s in ("pending", "running", "done", "failed", "cancelled")] == [2, 1, 5, 1, 4]
    with pytest.raises(ValueError, match="submitted"):
        jobs.count("submitted")


def test_the_snapshot_reply_hides_secrets():
    """A registered secret in an error or an event never leaves the engine in a snapshot reply."""
    register_secret("proto-s3cret-value")
    tunnel = dataclasses.replace(FULL.masters[0].tunnel, last_error="key proto-s3cret-value refused")
    snap = dataclasses.replace(
        FULL,
        masters=(dataclasses.replace(FULL.masters[0], tunnel=tunnel),),
        events=(TunnelFailed(at=1.0, source="h:1", error="proto-s3cret-value"),),
    )
    line = encode(SnapshotReply(snap))
    assert b"s3cret" not in line
    assert b"[REDACTED]" in line
    assert "s3cret" not in snap.redacted().to_json()


def test_a_real_tunnel_snapshot_is_typed_and_survives_the_wire(tmp_path: Path):
    """A real Tunnel reports a TunnelSnapshot, and its JSON form reads back as the same value."""

    async def no_probe(_timeout: float) -> None:
        return None

    tunnel = tunnel_for(
        Settings(via="headnode", remote_port=9001),
        MasterInfo(port=9123),
        emit=lambda _e: None,
        rundir=str(tmp_path),
        direct_probe=no_probe,
        clock=SystemClock(),
    )
    typed = tunnel.snapshot()
    assert isinstance(typed, TunnelSnapshot)
    assert TunnelSnapshot.from_dict(json.loads(json.dumps(typed.to_dict()))) == typed
    assert typed.state is TunnelState.NEW and typed.remote_port == 9001 and typed.master_port == 9123


@pytest.fixture
def engine():
    """A real engine on its own thread, serving a unix socket; stopped afterwards."""
    host = EngineThread(log=False)
    yield host
    host.stop()


def test_the_client_talks_to_a_real_engine(engine):
    """Through a real engine's socket: ping, a typed snapshot, and error replies raised with their text."""
    with EngineClient.connect(engine.socket_path, timeout=10) as client:
        client.ping()
        snap = client.snapshot()
        assert isinstance(snap, SupervisorSnapshot)
        assert snap.pid == os.getpid() and snap.masters == ()
        with pytest.raises(WQSupervisorError, match="bad request: 'm9'"):
            client.adapt("m9", 1, 2)
        client.detach("m9")  # detaching what is not attached is a no-op
        client.ping()  # and the connection is still good after an error


def test_the_client_knows_when_the_engine_went_away():
    """When the engine's end closes, on_close runs and every later request fails with a clear error."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    closed = threading.Event()
    client = EngineClient(mine, on_close=closed.set, reply_timeout=10)
    theirs.close()
    assert closed.wait(10)
    for _ in range(2):
        with pytest.raises(WQSupervisorError, match="the supervisor engine went away"):
            client.ping()
    client.close()


def test_the_client_relays_events_and_answers_in_order():
    """Events pushed between replies go to on_event with their state; the reply still answers the request."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    seen: list[tuple[object, TunnelState]] = []
    client = EngineClient(mine, on_event=lambda e, s: seen.append((e, s)), reply_timeout=10)
    up = TunnelUp(at=1.0, source="h:1", remote_port=1)

    def peer() -> None:
        with theirs, theirs.makefile("rb") as lines:
            assert decode_request(lines.readline()) == Ping()
            theirs.sendall(encode(EventMessage(up, TunnelState.UP)) + encode(Ack("ping")))

    thread = threading.Thread(target=peer)
    thread.start()
    try:
        client.ping()
    finally:
        thread.join(10)
        client.close()
    assert seen == [(up, TunnelState.UP)]


def test_the_status_socket_only_reads(engine):
    """On the status socket a snapshot comes back; attach, detach and adapt are refused and change nothing."""
    with EngineClient.connect(engine.status_path, timeout=10) as client:
        client.ping()
        assert isinstance(client.snapshot(), SupervisorSnapshot)
        foreign = Settings(via="headnode", remote_port=10001, ssh_program="/tmp/not-ssh")
        for request in (
            Attach(MasterInfo(port=9), foreign),
            Detach(id="1"),
            Adapt(id="1", minimum=0, maximum=1),
        ):
            with pytest.raises(WQSupervisorError, match="only answers snapshot requests"):
                client.request(request)
    assert not engine.engine.masters, "a reader attached a master"


def test_an_oversized_request_is_answered_and_the_engine_lives_on(engine):
    """A request line over the limit gets one error reply and a hang-up; the engine keeps serving."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(10)
        raw.connect(engine.status_path)
        raw.sendall(b'{"op": "snapshot", "pad": "' + b"x" * 100_000 + b'"}\n')
        reply = b""
        while chunk := raw.recv(65536):
            reply += chunk
    assert b"request longer than 65536 bytes" in reply
    with EngineClient.connect(engine.socket_path, timeout=10) as client:
        assert isinstance(client.snapshot(), SupervisorSnapshot)


def test_a_connection_cannot_detach_or_adapt_what_another_attached(engine, head, master, remote_port):
    """Two handles on the control socket: each may act only on the masters it attached itself."""
    settings = head.settings(remote_port=remote_port, allow_no_password=True)
    with (
        EngineClient.connect(engine.socket_path, timeout=10) as mine,
        EngineClient.connect(engine.socket_path, timeout=10) as other,
    ):
        attached = mine.attach(MasterInfo(port=master.port), settings)
        for request in (Detach(id=attached.id), Adapt(id=attached.id, minimum=0, maximum=1)):
            with pytest.raises(WQSupervisorError, match="was attached on this connection"):
                other.request(request)
        assert attached.id in engine.engine.masters
        mine.request(Detach(id=attached.id))
    wait_for(lambda: attached.id not in engine.engine.masters, 10, "the master to be detached")


def test_a_submission_heard_from_the_handle_samples_the_master_at_once(engine, head, master, remote_port):
    """With a minute between samples, 'submitted' has the master asked now: its new backlog is seen at once."""
    settings = head.settings(remote_port=remote_port, allow_no_password=True, stats_interval=60)
    done = threading.Event()

    def script_waits() -> None:  # the master answers status requests inside wait(), as a script calls it
        while not done.is_set():
            master.wait(1)

    waiting = threading.Thread(target=script_waits)
    waiting.start()
    try:
        with EngineClient.connect(engine.socket_path, timeout=10) as client:
            attached = client.attach(MasterInfo(port=master.port), settings)
            sup = engine.engine.masters[attached.id]
            wait_for(lambda: sup.stats is not None, 30, "the first sample")
            assert sup.stats is not None and sup.stats.tasks_waiting == 0
            for i in range(3):
                master.submit(f"echo {i}")
            client.submitted(attached.id, 3)
            wait_for(
                lambda: sup.stats is not None and sup.stats.tasks_waiting == 3, 10, "a sample of the backlog"
            )
            client.detach(attached.id)
    finally:
        done.set()
        waiting.join(10)

"""Resumable forwarding end to end: real sshd on loopback, a real master, real workers running tasks.

The tunnel's ssh (or the head's sshd session) dies while ``sleep 5`` tasks
run on two workers; the head relay holds the workers' connections, the next
session reattaches, and neither the master nor a worker notices: each
worker's TCP connection to the head's port and each of the master's
connections stays the same socket (a dropped worker would reconnect from a
new one; Debian's ``work_queue_server`` reports no ``workers_removed``
counter, so the sockets are the evidence), and every task returns once,
with its output.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import pytest

from wqsupervisor import TunnelDown, TunnelRestarting, TunnelUp, supervise
from wqsupervisor.backends import sessions_for
from wqsupervisor.events import RelayReattached, ResumptionOff
from wqsupervisor.harness.sandbox import HeadNode, start_worker
from wqsupervisor.process import terminate
from wqsupervisor.session import Detachable, Resumable
from wqsupervisor.wqserver import Task

from support import (
    TunnelCuts,
    assert_exactly_once,
    gone_supervisor,
    listening,
    ndcctools_bin,
    ndcctools_env,
    need_ndcctools,
    relay_pids,
    run_tasks,
    wait_for,
)


def _established_to(port: int) -> set[int]:
    """Local ports of this machine's established TCP connections to ``port``."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def _lasting(port: int) -> set[int]:
    """Connections to ``port`` seen twice, half a second apart (forward probes come and go)."""
    first = _established_to(port)
    time.sleep(0.5)
    return first & _established_to(port)


def _kill_ssh(sup, head: HeadNode) -> None:
    os.kill(sup.snapshot().masters[0].tunnel.ssh_pid, signal.SIGKILL)


def _kill_head_session(sup, head: HeadNode) -> None:
    assert head.kill_sessions()


def _restart_sshd(sup, head: HeadNode) -> None:
    head.restart(down_for=1.0)


@pytest.mark.parametrize(
    "fault",
    [_kill_ssh, _kill_head_session, _restart_sshd],
    ids=["ssh_sigkilled", "head_session_killed", "head_sshd_restarted"],
)
def test_tunnel_restart_with_tasks_running_costs_no_worker_and_no_task(
    head, master, remote_port, workers, recorder, fault
):
    """A tunnel restart under running sleep-5 tasks: workers_removed unchanged, every task once, tasks flow after."""
    before = set(relay_pids(remote_port))
    settings = head.settings(remote_port=remote_port, backend="resumable", stable_after=1.0)
    with supervise(master, settings, on_event=recorder) as sup:
        assert sup.wait_until_up(20)
        workers(remote_port, n=2)
        # The master accepts workers only inside wait().
        wait_for(lambda: master.wait(0.2) is None and master.stats.workers_connected == 2, 30, "two workers")
        start = master.stats
        workers_conns = _lasting(remote_port)
        master_conns = _lasting(master.port)
        assert len(workers_conns) >= 2 and len(master_conns) >= 2
        for i in range(4):
            master.submit(Task(f"sleep 5; echo out-{i}-$(({i}*7))", tag=str(i)))
        results: dict[str, list[str]] = {}
        deadline = time.monotonic() + 60
        cut = False
        while not master.empty():
            assert time.monotonic() < deadline, f"tasks not done: {results}"
            if not cut and master.stats.tasks_running >= 2:
                time.sleep(1.0)
                fault(sup, head)
                cut = True
            r = master.wait(0.5)
            if r is not None:
                assert r.ok, r
                results.setdefault(r.tag, []).append(r.output.strip())
        assert cut
        assert_exactly_once(results, 4)
        down = recorder.wait(TunnelDown, 5)[0]
        assert down.reason
        ups = recorder.wait(TunnelUp, 30, count=2)
        assert ups[1].restarts >= 1  # sshd down for 1 s: a few refused attempts first
        assert sup.snapshot().masters[0].tunnel.state.value == "up"
        assert workers_conns <= _established_to(remote_port), "a worker's connection to the head was lost"
        assert master_conns <= _established_to(master.port), "a connection to the master was replaced"
        after = master.stats
        assert after.workers_connected == 2
        assert after.workers_removed == start.workers_removed
        assert_exactly_once(run_tasks(master, 10), 10)
        assert workers_conns <= _established_to(remote_port)
        relays = set(relay_pids(remote_port)) - before
        assert len(relays) == 1, "one head relay carries the tunnel across the restart"
        taken = recorder.wait(RelayReattached, 10)[0]
        assert taken.connections >= 2 and 0 < taken.took < 30
        relay = sup.snapshot().masters[0].tunnel.relay
        assert relay is not None and relay.resumptions == 1 and relay.head_pid in relays
        assert sup.snapshot().masters[0].tunnel.resume_off is None
    wait_for(lambda: not listening(remote_port), 10, "the relay's port to close after close()")
    wait_for(lambda: not (set(relay_pids(remote_port)) & relays), 10, "the head relay to exit after close()")


def test_without_python_on_the_head_the_tunnel_forwards_as_before_and_says_why(
    head, master, remote_port, workers, recorder
):
    """relay_python names no program: plain forwarding runs the tasks; an event and the state say resumption is off."""
    before = set(relay_pids(remote_port))
    settings = head.settings(
        remote_port=remote_port, backend="resumable", relay_python="/nonexistent/python3"
    )
    with supervise(master, settings, on_event=recorder) as sup:
        assert sup.wait_until_up(20)
        off = recorder.wait(ResumptionOff, 10)[0]
        assert "/nonexistent/python3" in off.reason, off.reason
        snap = sup.snapshot().masters[0].tunnel
        assert snap.resume_off == off.reason
        assert snap.relay is None
        workers(remote_port, n=1)
        assert_exactly_once(run_tasks(master, 5), 5)
        assert not set(relay_pids(remote_port)) - before, "a relay was started"
    wait_for(lambda: not listening(remote_port), 10, "the remote port to close")


def test_close_while_the_session_is_down_still_ends_the_relay(head, master, remote_port):
    """The relay's session died and was not replaced: end_relay() (what close() calls) still ends it, no linger."""
    before = set(relay_pids(remote_port))

    async def body() -> None:
        with tempfile.TemporaryDirectory() as rundir:
            sessions = sessions_for(head.settings(remote_port=remote_port, backend="resumable"))
            assert isinstance(sessions, Resumable)
            await sessions.prepare(rundir, "down")
            session = await sessions.start(master_port=master.port, remote_port=remote_port, probes="probe")
            await asyncio.wait_for(session.established(), 10)
            session.kill_now()
            await asyncio.wait_for(session.exited(), 10)
            assert isinstance(session, Detachable)
            await session.detach()
            assert listening(remote_port), "the relay outlives its session"
            await sessions.end_relay()

    asyncio.run(body())
    wait_for(lambda: not listening(remote_port), 5, "the relay's port to close")
    wait_for(lambda: not set(relay_pids(remote_port)) - before, 5, "the relay to exit")


def test_ten_megabyte_inputs_and_outputs_survive_a_killed_ssh(
    head, master, remote_port, workers, recorder, tmp_path
):
    """ssh SIGKILLed while 10 MB inputs and outputs move: each file arrives intact, each task once, no worker lost."""
    import hashlib

    settings = head.settings(remote_port=remote_port, backend="resumable", stable_after=1.0)
    with supervise(master, settings, on_event=recorder) as sup:
        assert sup.wait_until_up(20)
        workers(remote_port, n=2)
        wait_for(lambda: master.wait(0.2) is None and master.stats.workers_connected == 2, 30, "two workers")
        workers_conns = _lasting(remote_port)
        sums = {}
        for i in range(6):
            data = os.urandom(10_000_000)
            (tmp_path / f"in-{i}").write_bytes(data)
            sums[str(i)] = hashlib.sha256(data).hexdigest()
            master.submit(
                Task(
                    "sha256sum in.dat | cut -d' ' -f1; head -c 10000000 /dev/urandom > out.dat; "
                    "sha256sum out.dat | cut -d' ' -f1",
                    tag=str(i),
                    input_files=[(str(tmp_path / f"in-{i}"), "in.dat")],
                    output_files=[(str(tmp_path / f"out-{i}"), "out.dat")],
                )
            )
        results: dict[str, list[str]] = {}
        cut = False
        deadline = time.monotonic() + 90
        while not master.empty():
            assert time.monotonic() < deadline, f"tasks not done: {sorted(results)}"
            r = master.wait(0.2)
            if r is not None:
                assert r.ok, r
                results.setdefault(r.tag, []).append(r.output)
                if not cut:
                    _kill_ssh(sup, head)  # the other worker's transfers are under way
                    cut = True
        assert cut
        assert sorted(results, key=int) == [str(i) for i in range(6)]
        for tag, outputs in results.items():
            assert len(outputs) == 1, f"task {tag} returned {len(outputs)} times"
            got_in, got_out = outputs[0].split()
            assert got_in == sums[tag], f"task {tag}: its input arrived changed"
            local = hashlib.sha256((tmp_path / f"out-{tag}").read_bytes()).hexdigest()
            assert local == got_out, f"task {tag}: its output came back changed"
        recorder.wait(TunnelUp, 30, count=2)
        assert workers_conns <= _established_to(remote_port), "a worker's connection to the head was lost"


def test_a_second_supervisor_on_a_live_relays_port_stops_and_names_the_first(head, master, remote_port):
    """The relay serves the first supervisor, which is alive: the second is refused by name, the first untouched."""
    import socket

    from wqsupervisor import WQSupervisorError
    from wqsupervisor.wqserver import WorkQueueServer

    settings = head.settings(remote_port=remote_port, backend="resumable", relay_linger=5.0)
    with supervise(master, settings) as first:
        assert first.wait_until_up(20)
        relay = first.snapshot().masters[0].tunnel.relay
        assert relay is not None
        with WorkQueueServer(name="wqs-second") as other:
            second = supervise(other, head.settings(remote_port=remote_port, backend="resumable"))
            try:
                with pytest.raises(WQSupervisorError) as failed:
                    second.wait_until_up(30)
                error = str(failed.value)
                assert "held by another wqsupervisor's relay" in error, error
                assert f"host {socket.gethostname()}, pid {first._agent.pid}," in error, error
            finally:
                second.close()
        tunnel = first.snapshot().masters[0].tunnel
        assert tunnel.state.value == "up" and tunnel.restarts == 0
        assert tunnel.relay is not None and tunnel.relay.head_pid == relay.head_pid
        assert tunnel.relay.resumptions == 0


def test_a_relay_whose_supervisor_is_gone_is_taken_over_by_the_next(head, master, remote_port):
    """The first supervisor is SIGKILLed with its head session hung (the relay keeps that carrier):
    the next one on the port is refused at first, retries, and takes the relay over, fresh."""
    settings = head.settings(remote_port=remote_port, keepalive_interval=1.0, relay_linger=30.0)
    assert settings.resume, "resumption is on by default"
    with gone_supervisor(master, settings):
        events: list = []
        with supervise(master, head.settings(remote_port=remote_port), on_event=events.append) as second:
            assert second.wait_until_up(60), second.failure
            waits = [e.why for e in events if isinstance(e, TunnelRestarting)]
            assert any("is gone" in why for why in waits), waits
            relay = second.snapshot().masters[0].tunnel.relay
            assert relay is not None and relay.resumptions == 0


_NDCCTOOLS_APP = """
import json, os, sys
from ndcctools.work_queue import Task, WorkQueue
from wqsupervisor import Settings, supervise
cfg, remote_port, workdir, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
big = os.path.join(workdir, "in.bin")
with open(big, "wb") as fh:
    fh.write(os.urandom(10 << 20))
q = WorkQueue(port=0, name="wqs-ndcc-resume")
settings = Settings(via="headnode", ssh_config=cfg, remote_port=remote_port, allow_no_password=True,
                    relay_linger=30.0)
with supervise(q, settings, log_events=False) as sup:
    assert sup.wait_until_up(30), sup.failure
    for i in range(n):
        if i % 2:
            # 10 MB in and 10 MB out, in flight while the tunnel is cut.
            t = Task("sleep 1; cat in.bin in.bin | head -c 10485760 > out.bin; md5sum < in.bin | cut -c1-32")
            t.specify_input_file(big, "in.bin", cache=False)
            t.specify_output_file(os.path.join(workdir, "out-%d.bin" % i), "out.bin", cache=False)
        else:
            t = Task("sleep 5; echo slept-%d" % i)
        t.specify_tag(str(i))
        q.submit(t)
    print("ready", sup._agent.pid, flush=True)
    results = []
    while not q.empty():
        t = q.wait(5)
        if t:
            results.append({"tag": t.tag, "output": (t.output or "").strip(), "result": t.result,
                            "tries": t._task.try_count, "lost": t._task.total_time_until_worker_failure})
            with open(os.path.join(workdir, "done"), "a") as fh:
                fh.write(t.tag + "\\n")
    tunnel = sup.snapshot().masters[0].tunnel
    print(json.dumps({"results": results, "workers_removed": q.stats.workers_removed,
                      "restarts": tunnel.restarts, "relay": tunnel.relay is not None}), flush=True)
"""


def _line(out: Any, start: str, timeout: float) -> str:
    """The app's next line that starts with ``start`` (cctools prints notices of its own there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = wait_for(out.readline, deadline - time.monotonic(), f"a line starting {start!r}")
        if line.startswith(start):
            return line
    raise AssertionError(f"no line starting {start!r} within {timeout} s")


def test_an_ndcctools_master_tries_every_task_once_through_resumed_sessions(head, remote_port, tmp_path):
    """ndcctools 7.17's own master, resumption on by default: ssh SIGKILLed, then the head's session, while
    `sleep 5` tasks and tasks with 10 MB inputs and outputs run on 2 workers. Every task returns once
    and right with try_count 1 and no time lost to a worker failure, and no worker is ever removed."""
    need_ndcctools("ndcctools.work_queue")
    n = 12
    argv = [
        sys.executable,
        "-c",
        _NDCCTOOLS_APP,
        str(head.ssh_config),
        str(remote_port),
        str(tmp_path),
        str(n),
    ]
    done = tmp_path / "done"
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=ndcctools_env(), cwd=tmp_path) as app:
        workers: list[subprocess.Popen[bytes]] = []
        try:
            assert app.stdout is not None
            ready = _line(app.stdout, "ready", 60).split()
            program = str(ndcctools_bin() / "work_queue_worker")
            workers = [start_worker(remote_port, program=program) for _ in range(2)]
            # Both cuts while tasks run: the first after 2 results, the second after 5.
            cuts = TunnelCuts(
                int(ready[1]), lambda: len(done.read_text().split()) if done.exists() else 0, 2, 5
            )
            cuts.start()
            summary = json.loads(_line(app.stdout, "{", 240))
            cuts.join(60)
        finally:
            for w in workers:
                terminate(w, grace=2)
            app.kill()
            app.wait()
    assert cuts.cuts == ["ssh", "session"]
    assert summary["relay"] and summary["restarts"] >= 2, summary
    assert summary["workers_removed"] == 0, summary
    results = summary["results"]
    assert sorted(int(r["tag"]) for r in results) == list(range(n))
    digest = hashlib.md5((tmp_path / "in.bin").read_bytes()).hexdigest()
    for r in results:
        i = int(r["tag"])
        assert (r["result"], r["tries"], r["lost"]) == (0, 1, 0), r
        assert r["output"] == (digest if i % 2 else f"slept-{i}"), r
        if i % 2:
            assert (tmp_path / f"out-{i}.bin").stat().st_size == 10 << 20

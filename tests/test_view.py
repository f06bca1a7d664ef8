"""The live console view: what render() shows for real snapshots, and LiveView in a real terminal."""

from __future__ import annotations

import datetime
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from wqsupervisor.backends import tunnel_for
from wqsupervisor.clock import SystemClock
from wqsupervisor.config import Settings
from wqsupervisor.engine import Engine, Supervised
from wqsupervisor.events import TunnelDown, TunnelFailed, TunnelUp, WorkersJoined
from wqsupervisor.logs import register_secret
from wqsupervisor.master import MasterInfo, MasterStats
from wqsupervisor.protocol import SupervisorSnapshot
from wqsupervisor.view import LiveView, render, should_use_live_view
from wqsupervisor.watch import WorkerWatch

from support import REPO, head_argv, python_env, wait_for

NOW = 1_700_000_000.0


# What JobTracker.snapshot() reports: counts by state, plus settings that are not states.
ENGINE_JOBS: dict[str, Any] = {
    "system": "slurm",
    "workdir": "/home/u/.wqs",
    "pending": 2,
    "running": 1,
    "done": 5,
    "failed": 1,
    "cancelled": 0,
    "submitted": 9,
    "min_workers": 1,
    "max_workers": 10,
    "submit_failures": 0,
}


def make_snapshot(
    *,
    state: str = "up",
    done: int = 12,
    submitted: int = 22,
    last_error: str | None = "ssh exited with status 255",
    jobs: dict[str, Any] | None = None,
    events: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One attached master, as the engine sends Engine.snapshot() in JSON."""
    master: dict[str, Any] = {
        "id": "m1",
        "master": {"port": 9123, "name": "demo", "pid": 4242},
        "tunnel": {
            "label": "headnode:9001",
            "via": "headnode",
            "remote_port": 9001,
            "master_port": 9123,
            "state": state,
            "since": NOW - 65,
            "restarts": 3,
            "stalls": 2,
            "resumes": 1,
            "reclaims": 0,
            "last_error": last_error,
            "rtt_ms": 12.5,
            "verified_by": "status",
            "ssh_pid": 111,
            "remote_pid": 222,
            "recoveries": [1.5, 0.25],
            "socket": "owned",
            "rto_capped": True,
            "resume_grace": 2.0,
            "tcp": None,
        },
        "workers": {"connected": 4, "idle": 1, "busy": 3, "peak": 5},
        "tasks": {"waiting": 7, "running": 3, "on_workers": 3, "done": done, "submitted": submitted},
        "stats_age": 0.5,
    }
    if jobs is not None:
        master["jobs"] = jobs
    return {
        "version": "0.1.0",
        "pid": 4242,
        "started": NOW - 300,
        "masters": [master],
        "finished": [],
        "events": events if events is not None else [],
    }


def typed(snapshot: dict[str, Any]) -> SupervisorSnapshot:
    """The snapshot a handle reads from the engine's JSON."""
    return SupervisorSnapshot.from_dict(snapshot)


def text_of(snapshot: SupervisorSnapshot | dict[str, Any], now: float = NOW) -> str:
    """render() of ``snapshot`` as plain text, 100 columns wide."""
    if isinstance(snapshot, dict):
        snapshot = typed(snapshot)
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(render(snapshot, now=now))
    return console.export_text()


def clock_of(epoch: float) -> str:
    """The local wall clock time the view shows for ``epoch``."""
    return datetime.datetime.fromtimestamp(epoch).strftime("%H:%M:%S")


def engine_snapshot(tmp_path: Path) -> SupervisorSnapshot:
    """A snapshot from a real Engine holding one real, never started, Tunnel."""
    clock = SystemClock()
    engine = Engine(clock=clock, rundir=str(tmp_path))
    settings = Settings(via="headnode", remote_port=9001)
    master = MasterInfo(port=9123, name="demo")

    async def no_probe(_timeout: float) -> None:
        return None

    tunnel = tunnel_for(
        settings, master, emit=lambda _e: None, rundir=str(tmp_path), direct_probe=no_probe, clock=clock
    )
    tunnel.record.restarts = 2
    tunnel.record.last_rtt = 0.004
    engine.masters["m1"] = Supervised(
        id="m1",
        master=master,
        settings=settings,
        tunnel=tunnel,
        watch=WorkerWatch(source="master:9123"),
        owner=None,
        stats=MasterStats(
            workers_connected=2, workers_busy=2, tasks_running=2, tasks_done=3, tasks_submitted=4
        ),
        stats_at=clock.monotonic(),
    )
    engine.recent.append(TunnelUp(at=clock.wall(), source=tunnel.label, remote_port=9001))
    return engine.snapshot()


def test_render_shows_tunnel_workers_tasks_and_progress():
    """A tunnel's state word, age, counters, RTT and error, the workers, and tasks with a progress bar."""
    text = text_of(make_snapshot())
    assert "headnode:9001 -> :9123  UP for 1m05s  restarts 3  stalls 2  rtt 12.5 ms" in text
    assert "ssh exited with status 255" in text
    assert "connected 4  idle 1  busy 3  peak 5" in text
    assert "waiting 7  running 3  done 12/22" in text
    assert "54%" in text
    assert "━" in text  # the bar itself
    assert "m1 master :9123 demo" in text
    assert "wqsupervisor 0.1.0  pid 4242  running 5m00s" in text


def test_render_a_real_engine_snapshot(tmp_path):
    """A snapshot taken from a real Engine renders its new tunnel, workers, tasks and event."""
    text = text_of(engine_snapshot(tmp_path), now=time.time())
    assert "headnode:9001 -> :9123  NEW" in text
    assert "restarts 2  stalls 0  rtt 4.0 ms" in text
    assert "connected 2  idle 0  busy 2" in text
    assert "done 3/4" in text
    assert "75%" in text
    assert "tunnel.up" in text


def test_render_colors_the_state():
    """Each state is drawn in its own style: green when up, red when failed."""
    console = Console(record=True, width=100, file=io.StringIO(), color_system="truecolor")
    console.print(render(typed(make_snapshot(state="up")), now=NOW))
    console.print(render(typed(make_snapshot(state="failed")), now=NOW))
    html = console.export_html(inline_styles=True)
    assert "color: #008000" in html  # green
    assert "background-color: #800000" in html  # white on red


def test_render_jobs_when_present_and_not_otherwise():
    """Jobs by state appear only when the snapshot has a "jobs" key, and only the states are shown."""
    with_jobs = text_of(make_snapshot(jobs=ENGINE_JOBS))
    assert "slurm: pending 2  running 1  done 5  failed 1  cancelled 0" in with_jobs
    assert "min_workers" not in with_jobs
    assert "/home/u" not in with_jobs
    bare = text_of(make_snapshot(jobs={"pending": 0, "running": 4, "done": 0, "failed": 0, "cancelled": 1}))
    assert "jobs     pending 0  running 4  done 0  failed 0  cancelled 1" in bare
    assert "jobs" not in text_of(make_snapshot())


def test_render_nothing_submitted_yet():
    """With no tasks submitted the view shows 0/0 without a percentage or a crash."""
    text = text_of(make_snapshot(done=0, submitted=0, last_error=None))
    assert "done 0/0" in text
    assert "%" not in text
    assert "error" not in text


def test_render_events_last_eight_with_local_times():
    """The last eight events appear in order with their local time, name, source and fields."""
    events = [
        WorkersJoined(at=NOW - 100 + i, source="master:9123", count=1, connected=i + 1).to_dict()
        for i in range(9)
    ]
    events.append(TunnelDown(at=NOW - 30, source="headnode:9001", reason="ssh exited").to_dict())
    text = text_of(make_snapshot(events=events))
    lines = [line for line in text.splitlines() if "workers.joined" in line or "tunnel.down" in line]
    assert len(lines) == 8
    assert lines[0].split() == [clock_of(NOW - 98), "workers.joined", "master:9123", "count=1", "connected=3"]
    assert lines[-1].split()[:4] == [clock_of(NOW - 30), "tunnel.down", "headnode:9001", "reason=ssh"]


def test_render_no_master():
    """Before any master attaches the view says so and still shows the header."""
    snap = make_snapshot()
    snap["masters"] = []
    text = text_of(snap)
    assert "no master attached yet" in text
    assert "none yet" in text


def test_render_finished_masters():
    """Detached masters are listed with their final state and tasks."""
    snap = make_snapshot()
    snap["finished"] = [
        dict(snap["masters"][0], id="m0", tunnel=dict(snap["masters"][0]["tunnel"], state="closed"))
    ]
    assert "m0 headnode:9001 closed, 3 restart(s), tasks done 12/22" in text_of(snap)


def test_render_redacts_secrets_and_shows_markup_literally():
    """Registered secrets never reach the screen, and text that looks like markup is shown as is."""
    register_secret("view-s3cret-value")
    events = [TunnelFailed(at=NOW, source="headnode:9001", error="auth view-s3cret-value refused").to_dict()]
    text = text_of(
        make_snapshot(state="failed", last_error="[bold]key view-s3cret-value[/bold]", events=events)
    )
    assert "s3cret" not in text
    assert "[bold]key [REDACTED][/bold]" in text
    assert "error=auth [REDACTED] refused" in text


def test_should_use_live_view_only_on_a_capable_terminal(monkeypatch):
    """True on a real pty; false for a pipe, a closed stream, and TERM=dumb."""
    monkeypatch.setenv("TERM", "xterm-256color")
    leader, follower = os.openpty()
    try:
        with open(follower, "w") as tty:
            assert should_use_live_view(tty)
            monkeypatch.setenv("TERM", "dumb")
            assert not should_use_live_view(tty)
    finally:
        os.close(leader)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert not should_use_live_view(io.StringIO())
    assert not should_use_live_view(tty)  # closed now
    assert not should_use_live_view(object())


def view_threads() -> list[threading.Thread]:
    """Threads LiveView started that are still alive."""
    return [t for t in threading.enumerate() if t.name == "wqsupervisor-view"]


def test_live_view_refreshes_in_the_background_and_stops_cleanly():
    """snapshot_fn is called repeatedly from a thread, and stop() leaves no thread behind."""
    calls = 0
    enough = threading.Event()

    def snapshot() -> SupervisorSnapshot:
        nonlocal calls
        calls += 1
        if calls >= 4:
            enough.set()
        return typed(make_snapshot(done=calls, submitted=100))

    out = io.StringIO()
    with LiveView(snapshot, console=Console(file=out, width=100), refresh=0.01) as view:
        assert view.running
        assert len(view_threads()) == 1
        assert enough.wait(30), "the view did not refresh"
    assert not view.running
    assert view_threads() == []
    assert "headnode:9001 -> :9123  UP" in out.getvalue()
    view.stop()  # a second stop is a no-op


def test_live_view_shows_a_failing_snapshot_instead_of_raising():
    """A raising snapshot_fn is shown in the view over the last good snapshot; the caller never sees it."""
    fail = threading.Event()

    def snapshot() -> SupervisorSnapshot:
        if fail.is_set():
            raise RuntimeError("engine loop is stuck")
        return typed(make_snapshot())

    console = Console(record=True, width=100, file=io.StringIO())
    view = LiveView(snapshot, console=console, refresh=0.01)
    view.start()
    try:
        fail.set()
        frame = view.frame()
    finally:
        view.stop()
    assert view_threads() == []
    console.print(frame)
    text = console.export_text()
    assert "snapshot failed: RuntimeError: engine loop is stuck (showing the last good snapshot)" in text
    assert "UP" in text


def test_live_view_without_any_snapshot():
    """A snapshot_fn that always fails still starts and stops, and says there is no snapshot yet."""

    def snapshot() -> SupervisorSnapshot:
        raise OSError("no engine")

    console = Console(record=True, width=100, file=io.StringIO())
    with LiveView(snapshot, console=console, refresh=0.01):
        pass
    text = console.export_text()
    assert "snapshot failed: OSError: no engine (no snapshot yet)" in text
    assert view_threads() == []


def test_live_view_rejects_a_nonpositive_refresh():
    """refresh must be a positive number of seconds."""
    with pytest.raises(ValueError, match="refresh"):
        LiveView(lambda: typed(make_snapshot()), refresh=0)


_SCRIPT = """\
import json, os, sys, threading, time
from wqsupervisor.protocol import SupervisorSnapshot
from wqsupervisor.view import LiveView, should_use_live_view

snap_path, stop_path = sys.argv[1], sys.argv[2]

def snapshot():
    with open(snap_path) as fh:
        return SupervisorSnapshot.from_json(fh.read())

print("live view wanted:", should_use_live_view(sys.stdout), flush=True)
with LiveView(snapshot, refresh=0.1):
    deadline = time.monotonic() + 120
    while not os.path.exists(stop_path) and time.monotonic() < deadline:
        time.sleep(0.05)
left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
print("view stopped, threads left:", left or "none", flush=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:  # keep the pane until the test has read it
    time.sleep(0.5)
"""


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_live_view_in_a_real_terminal(tmp_path):
    """Under tmux the screen follows the snapshot: state, progress, a failing snapshot, a clean stop."""
    script = tmp_path / "live.py"
    script.write_text(_SCRIPT)
    snap_path, stop_path = tmp_path / "snapshot.json", tmp_path / "stop"

    def publish(content: str) -> None:
        partial = tmp_path / "snapshot.json.new"
        partial.write_text(content)
        os.replace(partial, snap_path)

    name = f"wqs-view-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    env = dict(os.environ, PYTHONPATH=str(REPO), TERM=os.environ.get("TERM") or "xterm")

    def screen() -> str:
        res = subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", name], capture_output=True, text=True, check=False
        )
        return res.stdout

    def shows(*needles: str, absent: str | None = None) -> str | None:
        text = screen()
        ok = all(n in text for n in needles) and (absent is None or absent not in text)
        return text if ok else None

    def connecting() -> dict[str, Any]:
        snap = make_snapshot(state="connecting", done=0, submitted=20, last_error=None)
        snap["masters"][0]["tunnel"]["since"] = time.time()
        return snap

    publish(json.dumps(connecting()))
    command = shlex.join([sys.executable, str(script), str(snap_path), str(stop_path)])
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", name, "-x", "120", "-y", "40", command],
        env=env,
        check=True,
        capture_output=True,
    )
    try:
        wait_for(
            lambda: shows("live view wanted: True", "CONNECTING", "done 0/20"), 30, "the connecting frame"
        )

        up = make_snapshot(state="up", done=7, submitted=20, last_error=None)
        up["events"] = [TunnelUp(at=time.time(), source="headnode:9001", remote_port=9001).to_dict()]
        publish(json.dumps(up))
        wait_for(
            lambda: shows("UP for", "done 7/20", "35%", "tunnel.up", absent="CONNECTING"), 30, "the up frame"
        )

        publish("{ not json")
        wait_for(lambda: shows("snapshot failed: JSONDecodeError", "done 7/20"), 30, "the error frame")

        up["masters"][0]["tasks"]["done"] = 20
        publish(json.dumps(up))
        wait_for(lambda: shows("done 20/20", "100%", absent="snapshot failed"), 30, "the finished frame")

        stop_path.touch()
        final = wait_for(lambda: shows("view stopped, threads left: none"), 30, "a clean stop")
        assert "done 20/20" in final  # the last frame stays on screen
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, check=False)


def test_attach_shows_the_live_view_in_a_terminal(head, master, remote_port, tmp_path):
    """`attach` on a terminal (tmux): the live view shows the attached master and its tunnel UP; Ctrl-C
    ends it, the view stops and the summary line is printed, exit 0."""
    name = f"wqs-attach-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    env = dict(python_env(), TERM=os.environ.get("TERM") or "xterm")
    argv = head_argv("attach", head, remote_port, "--master-port", str(master.port), "--allow-no-password")
    command = shlex.join(argv) + f"; echo exit=$? > {shlex.quote(str(tmp_path / 'rc'))}; sleep 120"

    def screen() -> str:
        res = subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", name], capture_output=True, text=True, check=False
        )
        return res.stdout

    subprocess.run(
        [*tmux, "new-session", "-d", "-s", name, "-x", "140", "-y", "40", command], env=env, check=True
    )
    try:
        text = wait_for(
            lambda: next((t for t in [screen()] if "UP for" in t), None), 60, "the view, tunnel UP"
        )
        assert f"headnode:{remote_port}" in text and f"{master.port}" in text, text
        assert "tunnel.up" in text, text
        subprocess.run([*tmux, "send-keys", "-t", name, "C-c"], check=True)
        wait_for(lambda: (tmp_path / "rc").exists(), 60, "attach to end after Ctrl-C")
        assert (tmp_path / "rc").read_text().strip() == "exit=0"
        final = screen()
        assert f"wqsupervisor: master on port {master.port}" in final, final
        assert f"tunnel headnode:{remote_port} closed" in final, final
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, check=False)

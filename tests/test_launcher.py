"""The node launcher script itself, run with the real work_queue_worker and sh."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from wqsupervisor.children import comm
from wqsupervisor.harness.sandbox import ALIAS
from wqsupervisor.launcher import NodeLauncher, node_relay_argv
from wqsupervisor.relay.headmain import HOP_PROCESS_NAME, NODE_UP
from wqsupervisor.relay.program import source
from wqsupervisor.wqserver import Task

from support import assert_exactly_once, free_port, run_tasks, wait_for

HOP_NAME = HOP_PROCESS_NAME.decode()


def _scratch(tmp_path) -> set[str]:
    return {p.name for p in tmp_path.iterdir() if p.name.startswith("wqs-node.")}


def test_a_sigkilled_launchers_directory_is_swept_by_the_next_launcher(tmp_path):
    """SIGKILL runs no trap: the next launcher on the node removes the dead one's directory, not a live one's."""
    script = NodeLauncher(remote_port=free_port(), max_backoff=1).write(tmp_path / "launch.sh")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    first = subprocess.Popen(["sh", str(script)], env=env, stderr=subprocess.DEVNULL)
    second = None
    try:
        wait_for(lambda: len(_scratch(scratch)) == 1, 10, "the first launcher's directory")
        (dead,) = _scratch(scratch)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        time.sleep(0.5)
        assert _scratch(scratch) == {dead}, "SIGKILL left the directory (the case being swept)"
        live = subprocess.Popen(["sh", str(script)], env=env, stderr=subprocess.DEVNULL)
        second = live
        wait_for(lambda: dead not in _scratch(scratch) and len(_scratch(scratch)) == 1, 10, "the sweep")
        (mine,) = _scratch(scratch)
        third = subprocess.Popen(["sh", str(script)], env=env, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: len(_scratch(scratch)) == 2, 10, "the third launcher's directory")
            assert mine in _scratch(scratch), "a live launcher's directory was swept"
        finally:
            third.terminate()
            third.wait(10)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)
    wait_for(lambda: not _scratch(scratch), 10, "every directory gone after the launchers ended")


def _hop_daemons() -> list[int]:
    """Hop daemons of this machine (named ``wqs-hop``)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and comm(int(p)) == HOP_NAME]


def _launch(head, master, tmp_path, **options) -> tuple[subprocess.Popen[bytes], Path]:
    launcher = NodeLauncher(
        remote_port=master.port,
        via=ALIAS,
        ssh_args=("-F", str(head.ssh_config)),
        cores=1,
        memory_mb=512,
        disk_mb=1024,
        resume_hop=True,
        **options,
    )
    script = launcher.write(tmp_path / "launch.sh")
    log = tmp_path / "launcher.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["sh", str(script)], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    return proc, log


def test_a_resumable_hop_keeps_its_worker_while_the_head_kills_its_sessions(head, master, tmp_path):
    """The node relay runs the hop: every sshd session on the head killed twice under running tasks,
    the worker keeps its one connection to the master and every task comes back once."""
    before = set(_hop_daemons())
    proc, log = _launch(head, master, tmp_path)
    try:
        wait_for(lambda: master.wait(0.2) is None and master.stats.workers_connected == 1, 30, "the worker")
        hops = set(_hop_daemons()) - before
        assert len(hops) == 1, f"one hop daemon on the head: {hops}"
        for i in range(4):
            master.submit(Task(f"sleep 1; echo out-{i}-$(({i}*7))", tag=str(i)))
        results: dict[str, list[str]] = {}
        kills = 0
        deadline = time.monotonic() + 90
        while not master.empty():
            assert time.monotonic() < deadline, f"tasks not done: {results}\n{log.read_text()}"
            if kills < 2 and master.stats.tasks_running:
                assert head.kill_sessions(), "no session to kill"
                kills += 1
            r = master.wait(1)
            if r is not None:
                results.setdefault(r.tag, []).append(r.output.strip())
        assert_exactly_once(results, 4)
        stats = master.stats
        assert stats.workers_removed == 0 and stats.workers_connected == 1, log.read_text()
        assert log.read_text().count("hop resumed") >= 2, log.read_text()
        assert set(_hop_daemons()) - before == hops, "the same hop daemon carried the worker through"
    finally:
        proc.terminate()
        proc.wait(20)
    wait_for(lambda: not set(_hop_daemons()) - before, 10, "the hop daemon gone with its node relay")


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("node", "no-python3 on this node: a plain hop"),
        ("head", "the node relay's hop did not come up: a plain hop"),
    ],
)
def test_without_the_python_the_launcher_runs_the_plain_hop(head, master, tmp_path, where, says):
    """resume_hop with no such Python on the node, or on the head: the launcher says so, and its
    worker goes through ssh -L."""
    missing = str(tmp_path / "no-python3")
    before = set(_hop_daemons())
    proc, log = _launch(head, master, tmp_path, **{"python" if where == "node" else "head_python": missing})
    try:
        wait_for(lambda: master.wait(0.2) is None and master.stats.workers_connected == 1, 60, "the worker")
        text = log.read_text()
        assert says in text and "hop up:" in text, text
        assert_exactly_once(run_tasks(master, 3), 3)
    finally:
        proc.terminate()
        proc.wait(20)
    assert not set(_hop_daemons()) - before, "a hop daemon was left"


def _node_relay(head, remote_port: int, tmp_path, **options) -> tuple[subprocess.Popen[bytes], Path]:
    """A node relay as the launcher runs it, its stderr in a file."""
    argv = node_relay_argv([ALIAS], remote_port, ("-F", str(head.ssh_config)), **options)
    log = tmp_path / "relay.err"
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdin is not None
    proc.stdin.write(source())
    proc.stdin.close()
    return proc, log


def _relay_port(proc: subprocess.Popen[bytes], log: Path) -> int:
    """The worker's port, once the node relay says its first hop is up."""
    assert proc.stdout is not None
    words = proc.stdout.readline().split()
    proc.stdout.close()  # the relay says nothing more there
    assert words and words[0].decode() == NODE_UP, (words, log.read_text())
    return int(words[1])


def test_a_node_relay_that_no_hop_daemon_answers_gives_up_after_three_sessions(head, tmp_path):
    """The head's Python does not exist: three sessions, 1 s then 2 s apart, then exit status 1
    (the launcher then runs the plain hop)."""
    proc, log = _node_relay(head, free_port(), tmp_path, head_python=str(tmp_path / "no-python3"))
    try:
        assert proc.wait(30) == 1, log.read_text()
        assert proc.stdout is not None and proc.stdout.read() == b"", "it said it was up"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    text = log.read_text()
    assert re.findall(r"again in (\d+)s", text) == ["1", "2"], text
    assert "no hop daemon answered 3 sessions in a row: giving up" in text, text


def test_a_hop_daemon_whose_node_relay_was_killed_ends_after_its_linger(head, master, tmp_path):
    """SIGKILL leaves the hop daemon on the head: it closes its connection and exits once its linger passed."""
    before = set(_hop_daemons())
    proc, log = _node_relay(head, master.port, tmp_path, linger=3)
    port = _relay_port(proc, log)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            wait_for(lambda: set(_hop_daemons()) - before, 20, "the hop daemon on the head")
            proc.kill()
            proc.wait(10)
            time.sleep(1.5)
            assert set(_hop_daemons()) - before, "the hop daemon ended before its linger"
            wait_for(lambda: not set(_hop_daemons()) - before, 15, "the hop daemon gone after its linger")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    wait_for(lambda: not head.sessions(), 10, "the hop's session ended with its daemon")

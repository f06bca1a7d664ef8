"""The node launcher script itself, run with the real work_queue_worker and sh."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from wqsupervisor.children import comm
from wqsupervisor.harness.sandbox import ALIAS
from wqsupervisor.launcher import NodeLauncher
from wqsupervisor.relay.headmain import HOP_PROCESS_NAME
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


def test_a_node_without_the_python_gets_the_plain_hop(head, master, tmp_path):
    """resume_hop with no such Python on the node: the launcher says so and its worker goes through ssh -L."""
    proc, log = _launch(head, master, tmp_path, python=str(tmp_path / "no-python3"))
    try:
        wait_for(lambda: master.wait(0.2) is None and master.stats.workers_connected == 1, 30, "the worker")
        text = log.read_text()
        assert "no-python3 on this node: a plain hop" in text and "hop up:" in text, text
        assert_exactly_once(run_tasks(master, 3), 3)
    finally:
        proc.terminate()
        proc.wait(20)

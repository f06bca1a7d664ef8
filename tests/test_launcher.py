"""The node launcher script itself, run with the real work_queue_worker and sh."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from wqsupervisor.launcher import NodeLauncher

from support import free_port, wait_for


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

"""Run directories go when their engine goes, however it goes: by its owner, or by the next start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from wqsupervisor import rundir

from support import python_env, wait_for

_CREATOR = "from wqsupervisor import rundir; import time; print(rundir.create(), flush=True); time.sleep(300)"


def _created_by_a_process_that_dies(sig: int) -> tuple[str, subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CREATOR], stdout=subprocess.PIPE, text=True, env=python_env()
    )
    with proc.stdout:
        path = wait_for(proc.stdout.readline, 30, "the run directory").strip()
    (Path(path) / "probe.sock").write_text("")
    if sig:
        proc.send_signal(sig)
        proc.wait(10)
    return path, proc


def test_a_run_directory_is_private_and_named_after_its_creator():
    """create() makes a 0700 directory named after this process."""
    path = rundir.create()
    try:
        assert Path(path).name.startswith(f"wqs-{os.getpid()}-")
        assert Path(path).stat().st_mode & 0o777 == 0o700
    finally:
        rundir.remove(path)
    assert not Path(path).exists()


def test_the_next_start_sweeps_the_directory_of_a_sigkilled_creator():
    """A creator SIGKILLed with files in its directory: the next create() removes that directory."""
    path, _ = _created_by_a_process_that_dies(signal.SIGKILL)
    assert Path(path).exists(), "nothing removed it yet: its creator was killed"
    mine = rundir.create()
    try:
        assert not Path(path).exists()
    finally:
        rundir.remove(mine)


def test_a_live_creators_directory_and_other_names_are_left_alone(tmp_path):
    """Only directories of dead creators go: a live creator's, a lookalike name and a file stay."""
    path, proc = _created_by_a_process_that_dies(0)
    try:
        lookalikes = [tmp_path / "wqs-lab-abc", tmp_path / "wqs-debian-wq-0", tmp_path / "wqs-12x-y"]
        for d in lookalikes:
            d.mkdir()
        (tmp_path / "wqs-999999999-file").write_text("not a directory")
        assert rundir.sweep(str(tmp_path)) == []
        assert all(d.exists() for d in lookalikes)
        assert path not in rundir.sweep(tempfile.gettempdir())
        assert Path(path).exists(), "its creator still runs"
    finally:
        proc.kill()
        proc.wait()
        rundir.remove(path)


def test_another_users_directory_is_never_swept(tmp_path):
    """A dead creator's directory that belongs to another user stays where it is."""
    theirs = tmp_path / "wqs-999999999-abcdef"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    assert rundir.sweep(str(tmp_path)) == []
    assert theirs.exists()


def test_a_killed_demos_head_node_directory_with_its_keys_is_swept():
    """A process that made a loopback head node (keys included) is SIGKILLed: the next start removes it."""
    code = (
        "from wqsupervisor.harness.sandbox import HeadNode; import time\n"
        "h = HeadNode(); print(h.root, flush=True); time.sleep(300)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=python_env()
    ) as proc:
        with proc.stdout:
            root = Path(wait_for(proc.stdout.readline, 30, "the head node's directory").strip())
        assert root.name.startswith(f"wqs-{proc.pid}-head-") and (root / "user_key").exists()
        proc.kill()
        proc.wait(10)
    mine = rundir.create()
    try:
        assert not root.exists(), "the killed head node's keys were left behind"
    finally:
        rundir.remove(mine)

"""The scheduler's commands over one ssh connection of our own, and many submissions in one command.

Against a real sshd on loopback (the ``head`` fixture) and the real shell:
each command's own ``$SSH_CONNECTION`` says which TCP connection carried it.
The submission script runs in ``sh`` as it does on a head node; its "scheduler"
is a small program that accepts a number of jobs and then refuses, as qsub
does at a queue limit (the real sbatch runs it in ``tests/test_scaling.py``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from wqsupervisor import jobs
from wqsupervisor.batch.base import BatchOptions, LocalRunner, SshRunner, SubmitError
from wqsupervisor.batch.pbs import Pbs
from wqsupervisor.config import settings_from_kwargs
from wqsupervisor.harness.sandbox import HeadNode
from wqsupervisor.process import pid_alive

from support import free_port, wait_for

CONNECTION = ["sh", "-c", 'echo "$SSH_CONNECTION"']


def _runner(head: HeadNode, tmp_path: Path) -> SshRunner:
    return SshRunner(head.settings().ssh_target(), control=str(tmp_path / "batch.sock"))


async def _connection(runner: SshRunner) -> str:
    done = await runner.run(CONNECTION)
    assert done.returncode == 0, done.error_text
    return done.stdout.strip()


def test_commands_share_one_connection_of_our_own_and_it_ends_with_the_runner(head, tmp_path):
    """Five commands, one TCP connection (one master started); close() ends the master and its socket."""

    async def scenario() -> None:
        runner = _runner(head, tmp_path)
        assert runner.control is not None
        try:
            seen = {await _connection(runner) for _ in range(5)}
            assert len(seen) == 1, seen
            assert runner.control.starts == 1
            master = runner.control._proc
            assert master is not None and pid_alive(master.pid)
            assert os.path.exists(runner.control.path)
        finally:
            await runner.close()
        assert master.returncode is not None
        assert not os.path.exists(runner.control.path)

    asyncio.run(scenario())


def test_without_a_control_socket_each_command_has_its_own_connection(head):
    """The runner without ``control`` (and sessions that last, which use argv()) connect by themselves."""

    async def scenario() -> None:
        runner = SshRunner(head.settings().ssh_target())
        seen = {await _connection(runner) for _ in range(3)}
        assert len(seen) == 3, seen

    asyncio.run(scenario())


def test_a_killed_master_costs_one_new_connection_not_an_answer(head, tmp_path):
    """SIGKILL leaves a stale socket: the next command still answers, over a new master."""

    async def scenario() -> None:
        runner = _runner(head, tmp_path)
        assert runner.control is not None
        try:
            first = await _connection(runner)
            master = runner.control._proc
            assert master is not None
            os.kill(master.pid, signal.SIGKILL)
            await master.wait()
            assert os.path.exists(runner.control.path), "a SIGKILLed master leaves its socket"
            second = await _connection(runner)
            assert second != first
            assert runner.control.starts == 2
            assert await _connection(runner) == second
        finally:
            await runner.close()

    asyncio.run(scenario())


def test_an_unreachable_head_is_reported_as_ssh_says_and_the_next_command_reconnects(head, tmp_path):
    """sshd gone: status 255 (the scheduler then says 'unavailable'); sshd back: answers on a new master."""

    async def scenario() -> None:
        runner = _runner(head, tmp_path)
        assert runner.control is not None
        try:
            await _connection(runner)
            head.stop()
            down = await runner.run(CONNECTION, timeout=20)
            assert down.returncode == 255, down
            assert not runner.control.running
            head.start()
            assert await _connection(runner)
            assert runner.control.starts >= 2
        finally:
            await runner.close()

    asyncio.run(scenario())


# -- many submissions in one command ---------------------------------------------------------------

_QSUB = """#!/bin/sh
# Accepts $ACCEPT jobs (counted in $COUNTER), then refuses as PBS does at a queue limit.
script="$1"
[ -x "$script" ] || { echo "qsub: script file $script cannot be loaded" >&2; exit 2; }
n=$(cat "$COUNTER" 2>/dev/null || echo 0)
if [ "$n" -ge "$ACCEPT" ]; then echo "qsub: would exceed queue generic's per-user limit" >&2; exit 38; fi
echo $((n + 1)) >"$COUNTER"
echo "$((n + 1)).pbs"
"""


@pytest.fixture
def qsub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A qsub on PATH that accepts ACCEPT jobs and then refuses."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "qsub"
    program.write_text(_QSUB)
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("COUNTER", str(tmp_path / "count"))
    return tmp_path / "count"


def _pbs(tmp_path: Path, options: BatchOptions | None = None) -> Pbs:
    system = Pbs(LocalRunner(), options)
    system.workdir = str(tmp_path / "work")
    system.launcher_path = f"{system.workdir}/launcher.sh"
    return system


def test_submit_script_writes_the_job_script_once_and_submits_every_job_in_one_command(
    qsub, tmp_path, monkeypatch
):
    """submit(3) in one command: 3 ids, the script 0700 in a 0700 directory; a second round does not rewrite it."""
    monkeypatch.setenv("ACCEPT", "10")
    system = _pbs(tmp_path)
    assert asyncio.run(system.submit(3)) == ["1.pbs", "2.pbs", "3.pbs"]
    script = Path(system.workdir or "") / "pbs-job.sh"
    assert stat.S_IMODE(script.stat().st_mode) == 0o700
    assert stat.S_IMODE(script.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in script.parent.iterdir()) == ["pbs-job.sh"], "no temporary file is left"
    written = script.stat().st_ino
    assert asyncio.run(system.submit(2)) == ["4.pbs", "5.pbs"]
    assert script.stat().st_ino == written, "an unchanged script is not written again"


def test_submit_script_keeps_what_was_accepted_before_a_refusal_and_rewrites_after_a_failure(
    qsub, tmp_path, monkeypatch
):
    """Accept 2 of 4: both ids kept; then nothing accepted: SubmitError in qsub's words; a missing script is rewritten."""
    monkeypatch.setenv("ACCEPT", "2")
    system = _pbs(tmp_path)
    assert asyncio.run(system.submit(4)) == ["1.pbs", "2.pbs"]
    with pytest.raises(SubmitError) as refused:
        asyncio.run(system.submit(1))
    assert (
        refused.value.message
        == "qsub refused the worker job: qsub: would exceed queue generic's per-user limit"
    )
    script = Path(system.workdir or "") / "pbs-job.sh"
    script.unlink()  # a person cleaned up the work directory
    monkeypatch.setenv("ACCEPT", "3")
    assert asyncio.run(system.submit(1)) == ["3.pbs"]
    assert script.exists()


def test_submit_script_that_cannot_be_written_says_so(qsub, tmp_path, monkeypatch):
    """A work directory that cannot be created: 'cannot write the job script', and nothing submitted."""
    monkeypatch.setenv("ACCEPT", "10")
    (tmp_path / "file").write_text("")
    system = _pbs(tmp_path)
    system.workdir = str(tmp_path / "file" / "work")
    with pytest.raises(SubmitError, match="cannot write the job script"):
        asyncio.run(system.submit(1))
    assert not qsub.exists()


def test_control_connection_carries_a_batched_submission_to_the_head(head, tmp_path):
    """Over the control connection: the script written on the head and two jobs submitted in one command."""

    async def scenario() -> None:
        runner = _runner(head, tmp_path)
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "qsub").write_text(_QSUB)
        (bin_dir / "qsub").chmod(0o755)
        runner.env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "COUNTER": str(tmp_path / "count"), "ACCEPT": "5"}
        system = Pbs(runner)
        system.workdir = str(tmp_path / "work")
        system.launcher_path = f"{system.workdir}/launcher.sh"
        try:
            assert await system.submit(2) == ["1.pbs", "2.pbs"]
            assert runner.control is not None and runner.control.starts == 1
        finally:
            await system.close()
        wait_for(lambda: not os.path.exists(tmp_path / "batch.sock"), 5, "the control socket to go")
        assert not (tmp_path / "work").exists()

    asyncio.run(scenario())


def test_a_head_that_cannot_be_reached_hands_the_commands_to_the_next_and_they_stay_there(head, tmp_path):
    """The first head refuses ssh: the command answers from the second, and so do the ones after it."""

    async def scenario() -> None:
        good = head.settings().ssh_target()
        gone = replace(good, port=free_port())  # nothing listens there
        runner = SshRunner(gone, control=str(tmp_path / "batch.sock"), others=[good])
        try:
            done = await runner.run(["echo", "answered"])
            assert (done.returncode, done.stdout.strip()) == (0, "answered"), done
            assert runner.target == good
            assert await _connection(runner) == await _connection(runner), "one connection to the second head"
        finally:
            await runner.close()
        assert not list(tmp_path.glob("batch.sock*")), "a control socket was left"

    asyncio.run(scenario())


def test_each_head_is_asked_its_own_name_for_the_compute_nodes(head, tmp_path):
    """The first head down: its name stays the one it was given, and the second answers with its own.

    (Asked through the runner, which moves on when a head cannot be reached, the first would
    have answered with the second's name, and the node hops would never try the first again.)
    """
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host deadhead\\n    HostName 127.0.0.1\\n    Port {free_port()}\\n\\n" + head.ssh_config.read_text()
    )
    settings = settings_from_kwargs(
        {"via": ["deadhead", "headnode"]}, base=head.settings(remote_port=free_port())
    ).replace(ssh_config=str(config))
    assert asyncio.run(jobs._node_names(settings)) == ["deadhead", socket.gethostname()]
    given = settings.replace(node_via="login1.internal")
    assert asyncio.run(jobs._node_names(given)) == ["login1.internal", socket.gethostname()]

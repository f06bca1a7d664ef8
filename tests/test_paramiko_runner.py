"""ParamikoRunner against a real loopback sshd: the batch systems' commands with no ssh process.

Every test runs it through :func:`support.drive`, which fails when a thread or
a descriptor outlives the event loop: a runner that is closed leaves nothing.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import stat
from pathlib import Path

import pytest

from wqsupervisor.batch.base import SSH_FAILED, SshRunner, SubmitError, Unavailable
from wqsupervisor.batch.paramiko_runner import ParamikoRunner
from wqsupervisor.batch.slurm import Slurm
from wqsupervisor.clock import SystemClock
from wqsupervisor.config import Settings
from wqsupervisor.harness.sandbox import HeadNode
from wqsupervisor.jobs import JobTracker, build_tracker

from support import drive, ssh_entry, wait_for

# Words a shell would take apart if they reached it unquoted.
AWKWARD = [
    "a b",
    "it's",
    '"dq"',
    "$HOME",
    "`id`",
    "$(id)",
    "; echo injected",
    "back\\slash",
    "*",
    "",
    "tab\there",
]


def _runner(head: HeadNode, env: dict[str, str] | None = None) -> ParamikoRunner:
    return ParamikoRunner(head.settings(backend="paramiko").ssh_target(), env)


def test_a_command_gets_its_input_and_gives_back_output_errors_and_status(head):
    """stdin reaches the command; stdout, stderr and a non-zero exit status come back apart."""

    async def body() -> None:
        runner = _runner(head)
        try:
            done = await runner.run(
                ["sh", "-c", "cat; echo to-stderr >&2; exit 3"], input="line one\nline two\n"
            )
            assert (done.returncode, done.stdout, done.stderr, done.timed_out) == (
                3,
                "line one\nline two\n",
                "to-stderr\n",
                False,
            )
            assert (await runner.run(["true"])).returncode == 0
            assert await runner.home() == pwd.getpwnam(head.user).pw_dir
        finally:
            await runner.close()

    drive(body)


def test_arguments_and_batch_env_with_blanks_quotes_and_dollars_arrive_as_they_are(head):
    """Each word, and each batch_env value, reaches the head unchanged: quoted exactly as SshRunner quotes it."""
    env = {"WQS_AWKWARD": "a b $HOME 'q' \"dq\" `id`", "SLURM_CONF": "/etc/slurm conf"}

    async def body() -> None:
        runner = _runner(head, env)
        try:
            done = await runner.run(["printf", "%s\\n", *AWKWARD])
            assert done.returncode == 0, done.error_text
            assert done.stdout.split("\n")[:-1] == AWKWARD
            done = await runner.run(["sh", "-c", 'printf "%s|%s" "$WQS_AWKWARD" "$SLURM_CONF"'])
            assert done.stdout == f"{env['WQS_AWKWARD']}|{env['SLURM_CONF']}"
        finally:
            await runner.close()

    drive(body)
    ssh = SshRunner(head.settings().ssh_target(), env)
    argv = ["printf", "%s\\n", *AWKWARD]
    assert _runner(head, env).command_line(argv) == ssh.argv(argv)[-1]


def test_a_command_that_overruns_its_timeout_is_cut_and_the_next_one_runs(head):
    """A command past its timeout ends as timed out (124), and the connection still serves the next one."""

    async def body() -> None:
        runner = _runner(head)
        try:
            done = await runner.run(["sh", "-c", "echo started; exec sleep 3"], timeout=0.5)
            assert (done.returncode, done.timed_out) == (124, True)
            assert "timed out after 0.5 s" in done.stderr
            assert (await runner.run(["echo", "next"])).stdout == "next\n"
            assert runner.connects == 1
        finally:
            await runner.close()

    drive(body)


def test_write_replaces_a_file_atomically_with_its_mode_in_a_private_directory(head, tmp_path):
    """write() creates the directory 0700, the file with the mode asked, replaces it whole, leaves no temp file."""
    where = tmp_path / "work dir 'q'" / "$x"
    path = where / "launcher.sh"

    async def body() -> None:
        runner = _runner(head)
        try:
            await runner.write(str(path), "#!/bin/sh\necho one\n", 0o700)
            assert path.read_text() == "#!/bin/sh\necho one\n"
            assert stat.S_IMODE(path.stat().st_mode) == 0o700
            assert stat.S_IMODE(where.stat().st_mode) == 0o700
            await runner.write(str(path), "secret\n", 0o600)
            assert path.read_text() == "secret\n"
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert os.listdir(where) == ["launcher.sh"]
        finally:
            await runner.close()

    drive(body)


def test_a_connection_killed_on_the_head_is_made_again_for_the_next_command(head):
    """Its sshd session killed: the next command connects again (once) and runs."""

    async def body() -> None:
        runner = _runner(head)
        try:
            assert (await runner.run(["true"])).returncode == 0
            killed = head.kill_sessions(signal.SIGKILL)
            assert killed
            done = await runner.run(["echo", "again"])
            assert (done.returncode, done.stdout) == (0, "again\n")
            assert runner.connects == 2
        finally:
            await runner.close()

    drive(body)


def test_a_command_whose_connection_dies_under_it_is_not_run_again(head, tmp_path):
    """The connection lost while a command runs: 255 (unavailable), the command ran once, the next reconnects."""
    marker = tmp_path / "ran"

    async def body() -> None:
        runner = _runner(head)
        try:
            assert (await runner.run(["true"])).returncode == 0
            running = asyncio.create_task(
                runner.run(["sh", "-c", 'echo once >> "$1"; exec sleep 30', "sh", str(marker)])
            )
            await asyncio.to_thread(wait_for, marker.exists, 10, "the command to start")
            head.kill_sessions(signal.SIGKILL)
            done = await asyncio.wait_for(running, 20)
            assert done.returncode == SSH_FAILED and not done.timed_out
            assert "lost" in done.stderr
            assert (await runner.run(["true"])).returncode == 0
            assert runner.connects == 2
        finally:
            await runner.close()

    drive(body)
    assert marker.read_text() == "once\n"


def test_close_ends_the_connection_on_the_head(head):
    """close() ends the runner's sshd session (and every thread: drive checks); later commands get 255."""

    async def body() -> None:
        runner = _runner(head)
        assert (await runner.run(["true"])).returncode == 0
        assert head.sessions()
        await runner.close()
        await asyncio.to_thread(wait_for, lambda: not head.sessions(), 10, "the sshd session to end")
        done = await runner.run(["true"])
        assert done.returncode == SSH_FAILED
        assert "closed" in repr(runner)

    drive(body)


def test_an_unreachable_head_is_255_which_a_scheduler_reads_as_unavailable(head):
    """sshd gone: the command ends 255 with the connection's error, and Slurm's states() is Unavailable."""
    head.stop()

    async def body() -> None:
        runner = _runner(head)
        try:
            done = await runner.run(["true"])
            assert done.returncode == SSH_FAILED
            assert "Connection refused" in done.stderr, done.stderr
            with pytest.raises(Unavailable):
                await Slurm(runner).states(["1"])
            assert runner.connects == 0
        finally:
            await runner.close()

    drive(body)


def test_an_unknown_host_key_is_refused(head, tmp_path):
    """A head whose key is not in known_hosts: no command runs, and the error says it is the host key."""
    config = Path(head.ssh_config).read_text().replace(str(head.known_hosts), str(tmp_path / "empty"))
    (tmp_path / "empty").write_text("")
    (tmp_path / "config").write_text(config)
    target = head.settings(backend="paramiko").replace(ssh_config=str(tmp_path / "config")).ssh_target()

    async def body() -> None:
        runner = ParamikoRunner(target)
        try:
            done = await runner.run(["touch", str(tmp_path / "ran")])
            assert done.returncode == SSH_FAILED
            assert "host key" in done.stderr.lower(), done.stderr
        finally:
            await runner.close()

    drive(body)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("also_via", [(), ("headnode",)])
def test_the_tracker_of_a_paramiko_run_asks_the_heads_their_names_over_paramiko(head, also_via):
    """backend=paramiko, slurm, no node_via: the runner is ParamikoRunner and each head's own hostname is the hop."""
    settings = head.settings(backend="paramiko", workers="slurm", remote_port=10001, also_via=also_via)

    async def body() -> None:
        tracker = await build_tracker(
            settings,
            9123,
            10001,
            emit=lambda e: None,
            stats=lambda: None,
            tunnel_up=lambda: True,
            source="test",
            clock=SystemClock(),
        )
        assert isinstance(tracker, JobTracker)
        runner = tracker.system.runner
        try:
            assert isinstance(runner, ParamikoRunner)
            assert (tracker.launcher.via, tuple(tracker.launcher.also_via)) == (
                os.uname().nodename,
                (os.uname().nodename,) * len(also_via),
            )
        finally:
            await runner.close()

    drive(body)


def test_a_lasting_command_ends_when_its_input_ends_or_its_channel_closes(head, tmp_path):
    """start(): end of input lets the command end with its status; closing the channel ends its input too."""
    script = 'echo $$ > "$1.pid"; cat > /dev/null; echo ended > "$1"; exit 7'

    async def body() -> None:
        runner = _runner(head)
        try:
            first = await runner.start(["sh", "-c", script, "sh", str(tmp_path / "one")])
            await asyncio.to_thread(wait_for, (tmp_path / "one.pid").exists, 10, "the first command to start")
            assert first.returncode is None
            assert first.stdin is not None
            first.stdin.close()
            assert await asyncio.wait_for(first.wait(), 10) == 7
            assert first.returncode == 7
            second = await runner.start(["sh", "-c", script, "sh", str(tmp_path / "two")])
            await asyncio.to_thread(
                wait_for, (tmp_path / "two.pid").exists, 10, "the second command to start"
            )
            second.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(second.wait(), 10) == SSH_FAILED  # no exit status: we closed it
            await asyncio.to_thread(wait_for, (tmp_path / "two").exists, 10, "the head to end the second")
            assert first.pid != second.pid
        finally:
            await runner.close()

    drive(body)
    assert (tmp_path / "one").read_text() == (tmp_path / "two").read_text() == "ended\n"


def test_a_lasting_command_on_an_unreachable_head_is_a_submit_error(head):
    """start() with sshd gone: SubmitError with the connection's words (the tracker backs off on it)."""
    head.stop()

    async def body() -> None:
        runner = _runner(head)
        try:
            with pytest.raises(SubmitError, match="Connection refused"):
                await runner.start(["true"])
        finally:
            await runner.close()

    drive(body)


def test_proxyjump_and_the_jumps_host_key_are_the_backends(head, tmp_path):
    """Through ProxyJump the commands cross the jump's sshd; a jump with an unknown key is refused, named."""
    empty = tmp_path / "empty"
    empty.write_text("")
    good, bad = tmp_path / "good_config", tmp_path / "bad_config"
    with HeadNode(str(tmp_path / "inner")) as inner:
        inner_entry = ssh_entry("inner", inner, "ProxyJump jumphost")
        good.write_text(ssh_entry("jumphost", head) + inner_entry)
        bad.write_text(ssh_entry("jumphost", head, known_hosts=empty) + inner_entry)

        async def body() -> None:
            runner = ParamikoRunner(Settings(via="inner", ssh_config=str(good)).ssh_target())
            try:
                done = await runner.run(["echo", "through"])
                assert (done.returncode, done.stdout) == (0, "through\n"), done.error_text
                assert head.sessions() and inner.sessions(), "not through the jump host"
            finally:
                await runner.close()
            await asyncio.to_thread(
                wait_for, lambda: not head.sessions() and not inner.sessions(), 10, "both sessions to end"
            )
            runner = ParamikoRunner(Settings(via="inner", ssh_config=str(bad)).ssh_target())
            try:
                done = await runner.run(["true"])
                assert done.returncode == SSH_FAILED
                assert "jumphost" in done.stderr and "host key" in done.stderr.lower(), done.stderr
                assert not inner.sessions(), "the head was reached past an unknown jump host"
            finally:
                await runner.close()

        drive(body)


def test_commands_go_to_the_next_head_when_the_first_cannot_be_reached(head, tmp_path):
    """Heads [down, up]: the command runs on the second, which is then kept for the next commands."""
    config = tmp_path / "ssh_config"
    down = HeadNode(str(tmp_path / "down"))  # configured, never started: its port refuses
    try:
        down.client_config("127.0.0.1", config, alias="down")
        head.client_config("127.0.0.1", config, alias="up", append=True)
        first = Settings(via="down", ssh_config=str(config)).ssh_target()
        second = Settings(via="up", ssh_config=str(config)).ssh_target()

        async def body() -> None:
            runner = ParamikoRunner(first, others=[second])
            try:
                done = await runner.run(["echo", "here"])
                assert (done.returncode, done.stdout) == (0, "here\n"), done.error_text
                assert runner.target.destination == "up"
                assert (await runner.run(["true"])).returncode == 0
                assert runner.connects == 1
            finally:
                await runner.close()

        drive(body)
    finally:
        down.close()

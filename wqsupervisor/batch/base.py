"""What every place that starts workers shares: jobs, their states, and where commands run.

A :class:`BatchSystem` turns "start n workers" into jobs of its scheduler
(or plain processes) and reports their states. It is an adapter: the
decisions (how many, when) are the scaling policy's, the bookkeeping is the
job tracker's. Commands run through a :class:`Runner`: on this machine, or on
the head node through ssh to an :class:`~wqsupervisor.target.SshTarget`
(:class:`SshRunner`), or over paramiko with no ssh client
(:class:`~wqsupervisor.batch.paramiko_runner.ParamikoRunner`). A runner also
starts the jobs that last as long as a worker (:meth:`Runner.start`).
Schedulers driven by commands share one template,
:class:`~wqsupervisor.batch.scheduler.Scheduler`.

Every job runs the node launcher (:mod:`wqsupervisor.launcher`), which the
system writes once (mode 0700) into a private directory on the side where the
jobs start.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import enum
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import validation as check
from ..errors import WQSupervisorError
from ..launcher import NodeLauncher
from ..openssh import remote_argv
from ..process import owned_argv
from ..target import SshTarget
from .control import ControlConnection


class JobState(enum.Enum):
    """Where a job is, in every scheduler's words."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        """True while the job holds, or waits for, resources."""
        return self in (JobState.PENDING, JobState.RUNNING)


class SubmitError(WQSupervisorError):
    """The scheduler refused a submission; ``message`` carries its own error text."""


class Unavailable(WQSupervisorError):
    """The scheduler could not be asked (head node unreachable, command failing): states unknown."""


# How a runner reports a command it could not start at all, as a shell does.
NOT_FOUND, NOT_EXECUTABLE = 127, 126
# ssh's own exit status when it could not connect or log in (the remote command's is passed through).
SSH_FAILED = 255


@dataclass(frozen=True)
class Completed:
    """A finished command."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False
    """True when the runner gave up waiting and killed the command."""

    @property
    def error_text(self) -> str:
        """What the command said when it failed, for a person."""
        text = (self.stderr.strip() or self.stdout.strip() or f"exit status {self.returncode}").splitlines()
        return " / ".join(line.strip() for line in text[-3:])


class Closable(Protocol):
    """A lasting command's input."""

    def close(self) -> None:
        """Send end of file."""


class Lasting(Protocol):
    """A command that lasts as long as a job (a worker on the head node, the factory).

    What :class:`asyncio.subprocess.Process` offers, and all that
    :class:`~wqsupervisor.batch.local.Processes` uses of it: ending its input,
    or the command here, ends it there.
    """

    @property
    def pid(self) -> int:
        """A number that tells it from the runner's others (a local process id)."""

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has ended, else None."""

    @property
    def stdin(self) -> Closable | None:
        """Its input, open until closed."""

    def send_signal(self, sig: int) -> None:
        """Ask it to stop."""

    def kill(self) -> None:
        """Stop it now."""

    async def wait(self) -> int:
        """Wait until it has ended; its exit status."""


class Runner(abc.ABC):
    """Where a batch system's commands run."""

    @abc.abstractmethod
    async def run(self, argv: Sequence[str], *, input: str | None = None, timeout: float = 60.0) -> Completed:
        """Run one command and collect its output."""

    async def write(self, path: str, content: str, mode: int = 0o600) -> None:
        """Write ``content`` to ``path`` (creating its directory 0700), atomically, with ``mode``."""
        script = (
            'set -e; umask 077; d=$(dirname "$1"); mkdir -p "$d"; chmod 700 "$d"; '
            't=$(mktemp "$1.XXXXXX"); cat > "$t"; chmod "$2" "$t"; mv -f "$t" "$1"'
        )
        done = await self.run(["sh", "-c", script, "sh", path, format(mode, "o")], input=content)
        if done.returncode != 0:
            raise WQSupervisorError(f"cannot write {path}: {done.error_text}")

    async def start(self, argv: Sequence[str]) -> Lasting:
        """Start ``argv`` for as long as a job lasts, its input open (the node launcher, the factory)."""
        raise NotImplementedError(f"{type(self).__name__} cannot start lasting commands")

    async def close(self) -> None:  # noqa: B027 (most runners hold nothing)
        """Release what the runner holds (a connection); nothing by default."""

    async def home(self) -> str:
        """The home directory on that side."""
        done = await self.run(["sh", "-c", 'printf %s "${HOME:?}"'])
        if done.returncode != 0 or not done.stdout.strip():
            raise WQSupervisorError(f"cannot find the home directory there: {done.error_text}")
        return done.stdout.strip()


async def _communicate(argv: Sequence[str], input: str | None, timeout: float) -> Completed:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    # Said as a shell on the head node would say it, so both runners fail alike.
    except FileNotFoundError:
        return Completed(NOT_FOUND, "", f"{argv[0]}: command not found")
    except PermissionError:
        return Completed(NOT_EXECUTABLE, "", f"{argv[0]}: Permission denied")
    try:
        data = input.encode() if input is not None else None
        out, err = await asyncio.wait_for(proc.communicate(data), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return Completed(124, "", f"{argv[0]} timed out after {timeout:g} s", timed_out=True)
    assert proc.returncode is not None
    return Completed(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def remote_command(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """``argv`` as one command line for the head node's shell, each word quoted, run with ``env``."""
    command = " ".join(shlex.quote(a) for a in argv)
    if env:
        command = "env " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " " + command
    return command


async def _spawn(argv: Sequence[str]) -> asyncio.subprocess.Process:
    """A process of ours (it dies with this one), its input a pipe, its output discarded."""
    return await asyncio.create_subprocess_exec(
        *owned_argv(list(argv)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )


class LocalRunner(Runner):
    """Commands on this machine."""

    async def run(self, argv: Sequence[str], *, input: str | None = None, timeout: float = 60.0) -> Completed:
        """Run ``argv`` here."""
        return await _communicate(argv, input, timeout)

    async def start(self, argv: Sequence[str]) -> Lasting:
        """``argv`` as a process of ours."""
        return await _spawn(argv)


class SshRunner(Runner):
    """Commands on the head node, through ssh to ``target`` (or, when it cannot be reached, ``others``).

    With ``control`` (a socket path in a private directory), commands run over
    one multiplexed connection of our own
    (:class:`~wqsupervisor.batch.control.ControlConnection`), started on first
    use; without it, or while that connection is down, each command opens its
    own. ssh exits with status 255 when it could not reach or log in to the
    head node: the command is then tried on each of ``others`` (the cluster's
    other head nodes, which share its scheduler), and the first that answers is
    kept. When none can be reached, :mod:`wqsupervisor.batch.scheduler` reads
    the 255 as "unavailable".
    """

    def __init__(
        self,
        target: SshTarget,
        env: Mapping[str, str] | None = None,
        control: str | None = None,
        others: Sequence[SshTarget] = (),
    ) -> None:
        self.heads = [target, *others]
        self.env = dict(env or {})
        self._controls = [
            ControlConnection(head, f"{control}.{i}" if i else control) if control else None
            for i, head in enumerate(self.heads)
        ]
        self._at = 0

    @property
    def target(self) -> SshTarget:
        """The head node the commands go to now."""
        return self.heads[self._at]

    @property
    def control(self) -> ControlConnection | None:
        """That head node's control connection, if commands share one."""
        return self._controls[self._at]

    async def run(self, argv: Sequence[str], *, input: str | None = None, timeout: float = 60.0) -> Completed:
        """Run ``argv`` on the head node (a login shell is not needed, nor started)."""
        done = await self._run_here(argv, input, timeout)
        for _ in range(1, len(self.heads)):
            if done.returncode != SSH_FAILED:
                break
            self._at = (self._at + 1) % len(self.heads)
            done = await self._run_here(argv, input, timeout)
        return done

    async def _run_here(self, argv: Sequence[str], input: str | None, timeout: float) -> Completed:
        control = self.control
        if control is None or not await control.ready():
            return await _communicate(self.argv(argv), input, timeout)
        done = await _communicate(self.argv(argv, control.client_options()), input, timeout)
        if done.timed_out or done.returncode == SSH_FAILED:
            control.failed()  # the next command starts a new connection
        return done

    async def start(self, argv: Sequence[str]) -> Lasting:
        """``argv`` on the head node in an ssh session of its own, a process of ours; it ends with it."""
        return await _spawn(self.argv(argv))

    def argv(self, argv: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
        """The local ssh command line that runs ``argv`` on the head node, with ``env``.

        Without ``extra`` it opens a connection of its own: sessions that last
        (workers on the head node, the factory) use that, so that they do not
        end with the control connection.
        """
        ssh = remote_argv(self.target, remote_command(argv, self.env))
        ssh[1:1] = list(extra)
        return ssh

    async def close(self) -> None:
        """End the control connections."""
        for control in self._controls:
            if control is not None:
                await control.close()


@dataclass(frozen=True)
class BatchOptions:
    """What a job asks of its scheduler; each system uses the fields it knows."""

    partition: str | None = None
    account: str | None = None
    walltime: str | None = None  # HH:MM:SS
    cores: int = 1
    memory_mb: int | None = None
    disk_mb: int | None = None
    directives: tuple[str, ...] = ()  # extra lines for the job script's header, as they are
    env: Mapping[str, str] = field(default_factory=dict)  # environment for the scheduler's commands

    def __post_init__(self) -> None:
        # These go into job scripts and submit descriptions as they are: a line
        # break would start a line of its own there, a command or a directive.
        for name, example in (("partition", "gpu"), ("account", "proj42"), ("walltime", "02:00:00")):
            value = getattr(self, name)
            if value is not None:
                check.batch_word(name, value, example)
        for line in self.directives:
            check.text("directives", line, "a line of the job script")
        for key, value in self.env.items():
            check.env_name("env", key)
            if value:
                check.text(f"env {key}", value, "a value")


class BatchSystem(abc.ABC):
    """Starts worker jobs, cancels them, and reports their states."""

    name: str = "batch"

    def __init__(self, runner: Runner, options: BatchOptions | None = None) -> None:
        self.runner = runner
        self.options = options or BatchOptions()
        self.workdir: str | None = None
        self.launcher_path: str | None = None
        self.launcher: NodeLauncher | None = None

    async def prepare(self, launcher: NodeLauncher, password: bytes | None = None) -> None:
        """Write the node launcher (0700), and the password file (0600), into a private directory
        on the side where jobs start."""
        home = await self.runner.home()
        self.workdir = f"{home}/.wqsupervisor/{launcher.remote_port}"
        if password is not None:
            path = f"{self.workdir}/password"
            await self.runner.write(path, password.decode("utf-8", "surrogateescape"), 0o600)
            launcher = dataclasses.replace(launcher, password_file=path)
        self.launcher = launcher
        self.launcher_path = f"{self.workdir}/launcher.sh"
        await self.runner.write(self.launcher_path, launcher.script(), 0o700)

    @abc.abstractmethod
    async def submit(self, count: int) -> list[str]:
        """Start ``count`` worker jobs; their ids.

        Raises :class:`SubmitError` with the scheduler's words, or
        :class:`Unavailable` when the submission never reached the scheduler.
        """

    @abc.abstractmethod
    async def cancel(self, ids: Sequence[str]) -> None:
        """Stop these jobs (already finished ones are ignored).

        Raises :class:`Unavailable` when the scheduler cannot be asked, so that
        jobs are not taken for cancelled while they still hold the cluster.
        """

    @abc.abstractmethod
    async def states(self, ids: Sequence[str]) -> dict[str, JobState]:
        """The state of each job; ids the scheduler no longer knows are left out.

        Raises :class:`Unavailable` when the scheduler cannot be asked, so that
        an unreachable head node is never taken for jobs that have finished.
        """

    async def close(self) -> None:
        """Remove what :meth:`prepare` wrote, and release the runner."""
        try:
            if self.workdir:
                await self.runner.run(["rm", "-rf", self.workdir])
        finally:
            await self.runner.close()

    def describe(self) -> dict[str, Any]:
        """For status output."""
        return {"system": self.name, "workdir": self.workdir}

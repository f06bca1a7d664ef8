"""The template every scheduler driven by commands follows: run the command, judge it, parse its answer.

Slurm, HTCondor, PBS/Torque and Grid Engine differ in their commands and in
the words of their answers, not in how they are asked. :class:`Scheduler`
runs a system's command through its :class:`~wqsupervisor.batch.base.Runner`,
decides whether the scheduler answered at all (:func:`unanswered`), and hands
the output to the system's pure parser: text in, ``{job id: JobState}`` (or
job ids) out. Each system module declares its commands, its parsers and the
words of its "no such job" answers; nothing else.

A command that fails is not an answer. Its jobs' states are unknown, and
:class:`~wqsupervisor.batch.base.Unavailable` says so; the job tracker then
keeps them as they were, instead of taking them for finished and submitting
replacements (which leaked jobs on the cluster exactly when the network was
bad). Failing means: the runner gave up waiting, ssh could not reach the head
node (status 255), the command is not there (127), or any other non-zero
status whose output does not carry the scheduler's documented words for a job
it no longer knows.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

from ..errors import WQSupervisorError
from ..logs import get_logger
from .base import (
    NOT_FOUND,
    SSH_FAILED,
    BatchOptions,
    BatchSystem,
    Completed,
    JobState,
    Runner,
    SubmitError,
    Unavailable,
)

# Writes the job script ($1) when $2 is 1, from its input, 0700 and atomically; then runs the
# submission (the arguments after $3) $3 times, stopping at the first refusal. Each accepted
# submission's output is followed by a line of its own, so that they can be told apart.
SUBMIT_SCRIPT = """\
set -e
umask 077
d=$(dirname "$1"); mkdir -p "$d"; chmod 700 "$d"
if [ "$2" = 1 ]; then t=$(mktemp "$1.XXXXXX"); cat >"$t"; chmod 700 "$t"; mv -f "$t" "$1"; fi
echo wqs-written
set +e
n=$3; shift 3; i=0
while [ "$i" -lt "$n" ]; do
    out=$("$@"); status=$?
    if [ "$status" -ne 0 ]; then printf '%s\\n' "$out" >&2; exit "$status"; fi
    printf '%s\\nwqs-submitted\\n' "$out"
    i=$((i + 1))
done
"""
WRITTEN, SUBMITTED = "wqs-written", "wqs-submitted"
UNAVAILABLE_HINT = (
    "the jobs keep their last known states, and none is submitted, until the scheduler answers again"
)


def mentions(*words: str) -> Callable[[Completed], bool]:
    """A test of a failed command's output: True when it carries one of ``words`` (case ignored)."""
    lowered = tuple(w.lower() for w in words)

    def carries(done: Completed) -> bool:
        text = f"{done.stderr}\n{done.stdout}".lower()
        return any(word in text for word in lowered)

    return carries


def unreachable(done: Completed, program: str) -> str | None:
    """Why ``program`` never reached the scheduler (timeout, ssh failed, not installed), or None."""
    if done.timed_out:
        return f"{program} did not answer in time: {done.error_text}"
    if done.returncode == SSH_FAILED:
        return f"the head node could not be reached to run {program}: {done.error_text}"
    if done.returncode == NOT_FOUND:
        return f"{program} is not there (not installed, or not on PATH): {done.error_text}"
    return None


def never_reached(done: Completed, program: str) -> None:
    """Raise :class:`Unavailable` when a submission never reached the scheduler (see :func:`unreachable`)."""
    reason = unreachable(done, program)
    if reason is not None:
        raise Unavailable(f"cannot submit: {reason}", UNAVAILABLE_HINT)


def read_submissions(stdout: str) -> tuple[bool, list[str]]:
    """Read a batched submission's output: was the script written, and each accepted submission's output."""
    lines = stdout.splitlines()
    if WRITTEN not in lines:
        return False, []
    outputs: list[str] = []
    current: list[str] = []
    for line in lines[lines.index(WRITTEN) + 1 :]:
        if line == SUBMITTED:
            outputs.append("\n".join(current))
            current = []
        else:
            current.append(line)
    return True, outputs


def unanswered(done: Completed, program: str, no_such_job: Callable[[Completed], bool]) -> str | None:
    """Why ``done`` is no answer from the scheduler, for a person; None when it is one.

    A non-zero status is still an answer when ``no_such_job`` recognises the
    scheduler's words for ids it does not know (some schedulers fail the
    whole command for one such id, yet report the others).
    """
    reason = unreachable(done, program)
    if reason is not None:
        return reason
    if done.returncode == 0 or no_such_job(done):
        return None
    return f"{program} failed: {done.error_text}"


class Scheduler(BatchSystem):
    """A batch system whose jobs are a scheduler's, asked through its commands on the head node.

    A system declares :meth:`state_command` and :meth:`parse_states`,
    :meth:`cancel_command`, how it submits (:meth:`submit`, usually through
    :meth:`submit_script`), and the words of its "no such job" answers.
    """

    no_such_job_words: ClassVar[tuple[str, ...]] = ()
    """What the state command says of an id it does not know, when it then exits non-zero."""
    gone_job_words: ClassVar[tuple[str, ...]] = ()
    """What the cancel command says of a job that has already left (not a failure)."""
    failed_stay_queued: ClassVar[bool] = False
    """True when the state command lists queued jobs only: a FAILED one there waits for a person,
    and :meth:`close` removes it."""

    def __init__(self, runner: Runner, options: BatchOptions | None = None) -> None:
        super().__init__(runner, options)
        self.stuck: set[str] = set()
        self._written: dict[str, str] = {}

    def paths(self) -> tuple[str, str]:
        """The work directory and the launcher; only after :meth:`prepare`."""
        if self.workdir is None or self.launcher_path is None:
            raise WQSupervisorError("the node launcher is not written yet; call prepare() before submit()")
        return self.workdir, self.launcher_path

    async def ask(self, argv: Sequence[str], no_such_job: Sequence[str] = ()) -> Completed:
        """Run a scheduler command; its output, or :class:`Unavailable` when the scheduler did not answer."""
        done = await self.runner.run(argv)
        reason = unanswered(done, argv[0], mentions(*no_such_job))
        if reason is not None:
            raise Unavailable(reason, UNAVAILABLE_HINT)
        return done

    # -- states ------------------------------------------------------------------------

    @abc.abstractmethod
    def state_command(self, ids: Sequence[str]) -> list[str]:
        """The command line that reports these jobs."""

    @abc.abstractmethod
    def parse_states(self, text: str) -> dict[str, JobState]:
        """Read the output of :meth:`state_command` (pure)."""

    def match(self, ids: Sequence[str], found: Mapping[str, JobState]) -> dict[str, JobState]:
        """The states of ``ids`` among those found (the scheduler may list other jobs too)."""
        return {job: state for job, state in found.items() if job in ids}

    async def query(self, ids: Sequence[str]) -> dict[str, JobState]:
        """Ask the scheduler about ``ids``: every state its answer holds."""
        done = await self.ask(self.state_command(ids), self.no_such_job_words)
        return self.parse_states(done.stdout)

    async def states(self, ids: Sequence[str]) -> dict[str, JobState]:
        """Every job of ours the scheduler still knows; :class:`Unavailable` when it cannot be asked."""
        if not ids:
            return {}
        wanted = list(dict.fromkeys(ids))
        found = self.match(wanted, await self.query(wanted))
        if self.failed_stay_queued:
            self.stuck.update(job for job, state in found.items() if state is JobState.FAILED)
        return found

    # -- cancel ------------------------------------------------------------------------

    @abc.abstractmethod
    def cancel_command(self, ids: Sequence[str]) -> list[str]:
        """The command line that cancels these jobs."""

    async def cancel(self, ids: Sequence[str]) -> None:
        """Cancel the jobs; jobs already gone are no failure, an unreachable scheduler is."""
        if ids:
            await self.ask(self.cancel_command(ids), self.gone_job_words)

    # -- submit ------------------------------------------------------------------------

    async def run_submit(self, argv: Sequence[str], refused: str, hint: str) -> Completed:
        """Run a submission: :class:`Unavailable` if it never reached the scheduler,
        :class:`SubmitError` with the scheduler's words (after ``refused``) if it refused."""
        done = await self.runner.run(argv)
        never_reached(done, argv[0])
        if done.returncode != 0:
            raise SubmitError(f"{refused}: {done.error_text}", hint)
        return done

    async def submit_script(
        self,
        script: str,
        text: str,
        count: int,
        command: Sequence[str],
        parse: Callable[[str], str],
        hint: str,
    ) -> list[str]:
        """Write ``text`` to ``script`` (0700) and run ``command`` (which ends with it) ``count`` times,
        all in one command on the head node.

        The script is written only when it is not there yet as it is now (a
        failed round writes it again). Returns the ids ``parse`` reads from each
        submission's output. A first refusal raises :class:`SubmitError` with
        the scheduler's words (or :class:`Unavailable`); a later one keeps what
        was accepted, and the next round asks again.
        """
        if count <= 0:
            return []
        write = self._written.get(script) != text
        done = await self.runner.run(
            ["sh", "-c", SUBMIT_SCRIPT, "sh", script, "1" if write else "0", str(count), *command],
            input=text if write else None,
            timeout=60.0 + 2.0 * count,
        )
        try:
            ids = self._read_submissions(done, command[0], parse, hint)
        except WQSupervisorError:
            self._written.pop(script, None)
            raise
        self._written[script] = text
        return ids

    def _read_submissions(
        self, done: Completed, program: str, parse: Callable[[str], str], hint: str
    ) -> list[str]:
        """The ids of what the batched submission accepted, or why it accepted nothing."""
        written, outputs = read_submissions(done.stdout)
        if not written:
            never_reached(done, program)
            raise SubmitError(f"cannot write the job script: {done.error_text}")
        ids: list[str] = []
        for output in outputs:
            try:
                ids.append(parse(output))
            except ValueError as exc:
                raise SubmitError(str(exc)) from None
        if done.returncode != 0 and not ids:
            never_reached(done, program)
            raise SubmitError(f"{program} refused the worker job: {done.error_text}", hint)
        if done.returncode != 0:
            get_logger().info(
                "batch.submitted_part", system=self.name, accepted=len(ids), error=done.error_text
            )
        return ids

    # -- close -------------------------------------------------------------------------

    async def close(self) -> None:
        """Remove the failed jobs still queued that were seen, then the work directory."""
        if self.stuck:
            try:
                await self.cancel(sorted(self.stuck))
            except Unavailable as exc:
                get_logger().warning("batch.cancel_failed", system=self.name, error=exc.message)
            self.stuck.clear()
        await super().close()

"""HTCondor: ``condor_submit`` on the head node, ``condor_rm``, states from ``condor_q``/``condor_history``.

One submission queues ``count`` jobs as one cluster, so the ids are
``CLUSTER.0`` .. ``CLUSTER.(count-1)``. Each job runs ``/bin/sh <launcher>``
from the shared home (``should_transfer_files = NO``: HTCondor then matches only
machines of the submit host's ``FileSystemDomain``); its output, error and
event log go to the private work directory.

Options: ``cores``, ``memory_mb`` and ``disk_mb`` become ``request_cpus``,
``request_memory`` and ``request_disk``; ``account`` becomes
``accounting_group``; ``walltime`` becomes a ``periodic_remove`` of a job
running longer than that. HTCondor has no partitions: a ``partition`` is
refused (choose machines with a ``requirements = ...`` directive). Directives
go in verbatim just before ``queue``, so they can override any line above.

``JobStatus`` (HTCondor manual, "Job Status Codes") to :class:`JobState`:

* 1 Idle -> PENDING; 2 Running -> RUNNING; 6 Transferring Output -> RUNNING;
* 7 Suspended -> PENDING: it holds no worker now and may resume;
* 3 Removed -> CANCELLED;
* 4 Completed -> DONE when ``ExitCode`` is 0, else FAILED (the launcher exits
  with the worker's status);
* 5 Held -> FAILED. A held job never runs again unless a person releases it,
  and HTCondor holds a job only for an error (a limit exceeded, a file
  missing, a policy). As PENDING it would count among the jobs "on their way"
  for ever and stop scale-out. It stays in the queue with its ``HoldReason``
  for a person to read; :meth:`Condor.close` removes the held jobs it saw.

A completed job leaves the queue at once, so ids that ``condor_q`` no longer
lists are looked up in ``condor_history``, bounded by ``-limit`` (as many ads
as ids asked) and ``-scanlimit`` (so a long history stays cheap). Ids in
neither are left out; the job tracker deals with those.

Not run against a real HTCondor here (none runs on the test machine): the
parsers are tested on published outputs (``tests/data/batch``), the adapter on
the exact command lines it sends. What happens when the head
node or the scheduler cannot be asked is tested for real: the commands fail
on a real head node (``tests/test_scheduler_unavailable.py``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import ConfigError
from .base import BatchOptions, JobState, Runner, SubmitError, Unavailable
from .scheduler import UNAVAILABLE_HINT, Scheduler, unreachable

# JobStatus codes whose meaning does not depend on the exit code.
_STATUS = {
    "1": JobState.PENDING,
    "2": JobState.RUNNING,
    "3": JobState.CANCELLED,
    "5": JobState.FAILED,
    "6": JobState.RUNNING,
    "7": JobState.PENDING,
}
_COMPLETED = "4"
_AUTOFORMAT = ("-af:j", "JobStatus", "ExitCode")
_JOB_ID = re.compile(r"^\d+\.\d+$")
_SUBMITTED = re.compile(r"^\s*(\d+) job\(s\) submitted to cluster (\d+)\.", re.MULTILINE)
_WALLTIME = re.compile(r"^(\d+):([0-5]\d):([0-5]\d)$")
# How many history ads condor_history may read before it gives up on the rest.
HISTORY_SCAN_LIMIT = 10000


def walltime_seconds(walltime: str) -> int:
    """``HH:MM:SS`` (hours may pass 24) as seconds; :class:`ValueError` for anything else."""
    match = _WALLTIME.match(walltime.strip())
    if not match:
        raise ValueError(f"walltime {walltime!r} is not HH:MM:SS")
    hours, minutes, seconds = (int(part) for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _argument(path: str) -> str:
    # condor_submit's new argument syntax: the whole list in double quotes, one
    # argument in single quotes, each quote doubled inside.
    return '"' + "'" + path.replace('"', '""').replace("'", "''") + "'" + '"'


def submit_description(options: BatchOptions, workdir: str, launcher_path: str, count: int) -> str:
    """The submit description that queues ``count`` worker jobs, each running the node launcher once."""
    lines = [
        "# wqsupervisor worker jobs: each runs the node launcher once",
        "universe = vanilla",
        "executable = /bin/sh",
        f"arguments = {_argument(launcher_path)}",
        "transfer_executable = false",
        "should_transfer_files = NO",
        "batch_name = wqs-worker",
        f"output = {workdir}/condor-$(ClusterId).$(ProcId).out",
        f"error = {workdir}/condor-$(ClusterId).$(ProcId).err",
        f"log = {workdir}/condor.log",
        f"request_cpus = {options.cores}",
    ]
    if options.memory_mb:
        lines.append(f"request_memory = {options.memory_mb}")  # MiB, HTCondor's unit for memory
    if options.disk_mb:
        lines.append(f"request_disk = {options.disk_mb * 1024}")  # KiB, HTCondor's unit for disk
    if options.account:
        lines.append(f"accounting_group = {options.account}")
    if options.walltime:
        seconds = walltime_seconds(options.walltime)
        lines.append(f"periodic_remove = JobStatus == 2 && time() - EnteredCurrentStatus > {seconds}")
    lines += list(options.directives)
    lines.append(f"queue {count}")
    return "\n".join(lines) + "\n"


def parse_submit(text: str) -> list[str]:
    """The job ids in ``condor_submit`` output (``N job(s) submitted to cluster C.``): C.0 to C.N-1."""
    match = _SUBMITTED.search(text)
    if not match:
        raise ValueError(f"condor_submit printed no cluster: {text.strip()!r}")
    count, cluster = int(match.group(1)), match.group(2)
    return [f"{cluster}.{proc}" for proc in range(count)]


def parse_autoformat(text: str) -> dict[str, list[str]]:
    """Lines of ``-af:j`` output (``CLUSTER.PROC value ...``) as {job id: values}; other lines are skipped."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split()
        if fields and _JOB_ID.match(fields[0]):
            rows[fields[0]] = fields[1:]
    return rows


def job_state(status: str, exit_code: str = "undefined") -> JobState | None:
    """A ``JobStatus`` code, with ``ExitCode`` as ``-af`` prints it, as a :class:`JobState` or None."""
    if status == _COMPLETED:
        return JobState.DONE if exit_code == "0" else JobState.FAILED
    return _STATUS.get(status)


def parse_states(text: str) -> dict[str, JobState]:
    """Read ``condor_q``/``condor_history ... -af:j JobStatus ExitCode`` output."""
    out: dict[str, JobState] = {}
    for job, values in parse_autoformat(text).items():
        if not values:
            continue
        state = job_state(values[0], values[1] if len(values) > 1 else "undefined")
        if state is not None:
            out[job] = state
    return out


class Condor(Scheduler):
    """Worker jobs in an HTCondor pool, submitted on the head node (the access point)."""

    name = "condor"
    # condor_q exits 0 for ids it does not know; condor_rm complains of jobs already gone.
    gone_job_words = ("Couldn't find/remove all jobs", "not found")

    def __init__(self, runner: Runner, options: BatchOptions | None = None) -> None:
        super().__init__(runner, options)
        if self.options.partition:
            raise ConfigError(
                f"HTCondor has no partitions, so partition {self.options.partition!r} cannot be used",
                "remove it; choose machines with a directive such as 'requirements = (Arch == \"X86_64\")'",
            )
        if self.options.walltime:
            try:
                walltime_seconds(self.options.walltime)
            except ValueError as exc:
                raise ConfigError(str(exc), "write the walltime as HH:MM:SS, for example 04:00:00") from None

    def submit_description(self, count: int) -> str:
        """The submit description for ``count`` worker jobs."""
        workdir, launcher = self.paths()
        return submit_description(self.options, workdir, launcher, count)

    async def submit(self, count: int) -> list[str]:
        """Queue ``count`` worker jobs with one ``condor_submit``."""
        if count <= 0:
            return []
        workdir, _ = self.paths()
        path = f"{workdir}/worker.sub"
        await self.runner.write(path, self.submit_description(count), 0o600)
        done = await self.run_submit(
            ["condor_submit", path],
            "condor_submit refused the worker jobs",
            f"check the account and directives in {path}; 'condor_submit -dry-run - {path}' shows more",
        )
        try:
            return parse_submit(done.stdout)
        except ValueError as exc:
            raise SubmitError(str(exc)) from None

    def cancel_command(self, ids: Sequence[str]) -> list[str]:
        """``condor_rm`` the jobs."""
        return ["condor_rm", *ids]

    def state_command(self, ids: Sequence[str]) -> list[str]:
        """``condor_q`` of these jobs (ids before -af: its words up to the next option are attributes)."""
        return ["condor_q", *ids, *_AUTOFORMAT]

    def history_command(self, ids: Sequence[str]) -> list[str]:
        """``condor_history`` of jobs that left the queue, bounded."""
        limits = ["-limit", str(len(ids)), "-scanlimit", str(HISTORY_SCAN_LIMIT)]
        return ["condor_history", *limits, *ids, *_AUTOFORMAT]

    def parse_states(self, text: str) -> dict[str, JobState]:
        """Read the output of :meth:`state_command` or :meth:`history_command`."""
        return parse_states(text)

    async def query(self, ids: Sequence[str]) -> dict[str, JobState]:
        """States from ``condor_q``, and from ``condor_history`` for jobs that left the queue."""
        done = await self.ask(self.state_command(ids))
        found = self.match(ids, parse_states(done.stdout))
        # Still queued yet failed means held (or kept completed): remove those on close.
        self.stuck.update(job for job, state in found.items() if state is JobState.FAILED)
        missing = [job for job in ids if job not in found]
        if missing:
            history = await self.runner.run(self.history_command(missing))
            reason = unreachable(history, "condor_history")
            if reason is not None:
                raise Unavailable(reason, UNAVAILABLE_HINT)
            # condor_q has answered that these jobs left the queue; a history that cannot be
            # read (none kept here) only leaves out how they ended.
            if history.returncode == 0:
                found.update(self.match(missing, parse_states(history.stdout)))
        return found

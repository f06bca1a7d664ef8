"""PBS Professional / OpenPBS (:class:`Pbs`) and Torque (:class:`Torque`): ``qsub``, ``qdel``, ``qstat``.

One ``qsub`` per worker job; the script runs ``exec sh <launcher>`` under
``/bin/sh``, joins stderr to stdout and sends it into the private work
directory (a directory as ``-o`` path: PBS Pro names the file
``<jobid>.OU``, Torque ``<name>.o<seq>``). ``partition`` is the queue
(``-q``), ``account`` is ``-A``, ``walltime`` is ``-l walltime=``; cores and
memory are ``-l select=1:ncpus=N:mem=Mmb`` on PBS Pro and ``-l nodes=1:ppn=N``
plus ``-l mem=Mmb`` on Torque. Neither has a standard per-job disk request, so
``disk_mb`` is not sent. Directives go in verbatim after these lines.

States come from machine-readable ``qstat``: ``qstat -f -F json -x`` on PBS
Pro (``-x`` adds finished jobs while the server keeps job history), ``qstat
-x`` (XML) on Torque, which lists completed jobs for ``keep_completed``
seconds. ``job_state`` letters (qstat(1B)) to :class:`JobState`:

* Q queued, H held, W waiting for its start time, T in transit,
  S suspended, U suspended by keyboard activity -> PENDING;
* R running, E exiting after having run, B array job begun -> RUNNING;
* F finished, X finished subjob, C completed (Torque) -> DONE when the exit
  status is 0, FAILED when it is anything else, CANCELLED when there is none
  (the job was deleted before it ran);
* M moved to another server -> left out: the id no longer names a job here.

An array's summary record (``123[].server``) is no job of ours and is left out.

A PBS hold is left to people or dependencies and is undone by ``qrls``, so H
stays PENDING (unlike HTCondor, which holds only on errors).

Not run against a real PBS or Torque here (none runs on the test machine):
the parsers are tested on published outputs (``tests/data/batch``), the
adapter on the exact command lines it sends. What happens when the head
node or the scheduler cannot be asked is tested for real: the commands fail
on a real head node (``tests/test_scheduler_unavailable.py``).
"""

from __future__ import annotations

import json
import re
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

from .base import BatchOptions, JobState
from .qdel import QdelScheduler

_ACTIVE = {
    "Q": JobState.PENDING,
    "H": JobState.PENDING,
    "W": JobState.PENDING,
    "T": JobState.PENDING,
    "S": JobState.PENDING,
    "U": JobState.PENDING,
    "R": JobState.RUNNING,
    "E": JobState.RUNNING,
    "B": JobState.RUNNING,
}
_FINISHED = frozenset("FXC")
# 123, 123.server, 123[].server, 123[4].server.domain
_JOB_ID = re.compile(r"^\d+(\[\d*\])?(\.[\w.-]+)?$")
_VARIABLE_LIST = re.compile(r"<Variable_List>.*?</Variable_List>", re.DOTALL)


def _header(options: BatchOptions, workdir: str, resources: Sequence[str]) -> list[str]:
    lines = [
        "#!/bin/sh",
        "#PBS -N wqs-worker",
        "#PBS -S /bin/sh",
        "#PBS -j oe",
        f"#PBS -o {workdir}/",
        *(f"#PBS -l {resource}" for resource in resources),
    ]
    if options.walltime:
        lines.append(f"#PBS -l walltime={options.walltime}")
    if options.partition:
        lines.append(f"#PBS -q {options.partition}")
    if options.account:
        lines.append(f"#PBS -A {options.account}")
    return lines + list(options.directives)


def job_script(options: BatchOptions, workdir: str, launcher_path: str) -> str:
    """The PBS Pro batch script of one worker job."""
    select = f"select=1:ncpus={options.cores}"
    if options.memory_mb:
        select += f":mem={options.memory_mb}mb"
    lines = _header(options, workdir, [select])
    return "\n".join([*lines, "", f"exec sh {shlex.quote(launcher_path)}", ""])


def torque_job_script(options: BatchOptions, workdir: str, launcher_path: str) -> str:
    """The Torque batch script of one worker job."""
    resources = [f"nodes=1:ppn={options.cores}"]
    if options.memory_mb:
        resources.append(f"mem={options.memory_mb}mb")
    lines = _header(options, workdir, resources)
    return "\n".join([*lines, "", f"exec sh {shlex.quote(launcher_path)}", ""])


def parse_submit(text: str) -> str:
    """The job id ``qsub`` printed (``123.server``), from the last line of its output."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    job = lines[-1] if lines else ""
    if not _JOB_ID.match(job):
        raise ValueError(f"qsub printed no job id: {text.strip()!r}")
    return job


def job_state(letter: str, exit_status: int | None = None) -> JobState | None:
    """A ``job_state`` letter (and exit status, for finished jobs) as a :class:`JobState`; None if unknown."""
    if letter in _ACTIVE:
        return _ACTIVE[letter]
    if letter in _FINISHED:
        if exit_status is None:
            return JobState.CANCELLED
        return JobState.DONE if exit_status == 0 else JobState.FAILED
    return None


def _exit_status(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def parse_pbspro_states(text: str) -> dict[str, JobState]:
    """Read ``qstat -f -F json -x`` output (PBS Pro): {job id: state}; nothing if it is not JSON."""
    try:
        # strict=False: PBS copies environment values into the JSON with raw control characters.
        data = json.loads(text, strict=False)
    except ValueError:
        return {}
    jobs = data.get("Jobs") if isinstance(data, dict) else None
    out: dict[str, JobState] = {}
    if not isinstance(jobs, dict):
        return out  # no "Jobs" key at all when none of the ids is known
    for job, attrs in jobs.items():
        if not isinstance(attrs, dict) or "[]" in job:
            continue
        state = job_state(str(attrs.get("job_state", "")), _exit_status(attrs.get("Exit_status")))
        if state is not None:
            out[job] = state
    return out


def parse_torque_states(text: str) -> dict[str, JobState]:
    """Read ``qstat -x`` output (Torque XML): {job id: state}; nothing if it is not XML."""
    # Variable_List holds the job's environment verbatim, which is not always valid XML.
    cleaned = _VARIABLE_LIST.sub("", text).strip()
    if not cleaned:
        return {}
    try:
        root = ET.fromstring(cleaned)  # noqa: S314 - our own qstat's output, not a stranger's
    except ET.ParseError:
        return {}
    out: dict[str, JobState] = {}
    for node in root.iter("Job"):
        job = (node.findtext("Job_Id") or "").strip()
        letter = (node.findtext("job_state") or "").strip()
        state = job_state(letter, _exit_status(node.findtext("exit_status")))
        if job and "[]" not in job and state is not None:
            out[job] = state
    return out


def match_ids(ids: Sequence[str], found: Mapping[str, JobState]) -> dict[str, JobState]:
    """Report ``found`` under the ids we asked about; ``123.short`` also matches ``123.short.domain``."""
    by_number = {job.split(".", 1)[0]: state for job, state in found.items()}
    out: dict[str, JobState] = {}
    for job in ids:
        if job in found:
            out[job] = found[job]
        elif job.split(".", 1)[0] in by_number:
            out[job] = by_number[job.split(".", 1)[0]]
    return out


class Pbs(QdelScheduler):
    """Worker jobs on a PBS Professional or OpenPBS cluster."""

    name = "pbs"
    # qstat exits non-zero when one id is unknown (or finished and out of the history),
    # yet still reports the others.
    no_such_job_words = ("Unknown Job Id", "Job has finished")

    def job_script(self) -> str:
        """The batch script of one worker job."""
        return job_script(self.options, *self.paths())

    def state_command(self, ids: Sequence[str]) -> list[str]:
        """The ``qstat`` command line that reports these jobs."""
        return ["qstat", "-f", "-F", "json", "-x", *ids]

    def parse_states(self, text: str) -> dict[str, JobState]:
        """Read the output of :meth:`state_command`."""
        return parse_pbspro_states(text)

    def match(self, ids: Sequence[str], found: Mapping[str, JobState]) -> dict[str, JobState]:
        """Report ``found`` under the ids we asked about (qstat may spell the server longer)."""
        return match_ids(ids, found)

    async def submit(self, count: int) -> list[str]:
        """``qsub`` the job script ``count`` times."""
        workdir, _ = self.paths()
        script = f"{workdir}/{self.name}-job.sh"
        return await self.submit_script(
            script,
            self.job_script(),
            count,
            ["qsub", script],
            parse_submit,
            f"check the queue, account, walltime and resources in {script} against "
            "the cluster's limits ('qstat -Q' lists the queues)",
        )


class Torque(Pbs):
    """Worker jobs on a Torque cluster (the same commands as PBS, older resource and XML forms)."""

    name = "torque"

    def job_script(self) -> str:
        """The batch script of one worker job."""
        return torque_job_script(self.options, *self.paths())

    def state_command(self, ids: Sequence[str]) -> list[str]:
        """The ``qstat`` command line that reports these jobs (XML)."""
        return ["qstat", "-x", *ids]

    def parse_states(self, text: str) -> dict[str, JobState]:
        """Read the output of :meth:`state_command`."""
        return parse_torque_states(text)

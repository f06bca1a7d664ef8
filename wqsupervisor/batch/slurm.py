"""Slurm: ``sbatch`` on the head node over ssh, ``scancel``, states from ``squeue``.

Run against a real single-node Slurm (Debian's slurm-wlm 22.05) in the
firewall lab: see ``tests/test_scaling.py``. Finished jobs stay listed by
``squeue -t all`` for ``MinJobAge`` (300 s by default); ``sacct`` is used only
when accounting is configured, since it fails without slurmdbd. squeue and
scancel fail the whole command for an id Slurm no longer knows ("Invalid job
id specified"): that is an answer; any other failure makes the states
unknown (see :mod:`wqsupervisor.batch.scheduler`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from .base import JobState
from .scheduler import Scheduler

_PLAIN = re.compile(r"[A-Za-z0-9_./%:@+=,-]+")
# squeue's %T names, in Slurm's words.
_STATES = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.PENDING,
    "STOPPED": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "COMPLETED": JobState.DONE,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "FAILED": JobState.FAILED,
    "TIMEOUT": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
}


def parse_states(text: str) -> dict[str, JobState]:
    """Read ``squeue -h -o '%i %T'`` output (array tasks such as 12_3 keep their full id)."""
    out: dict[str, JobState] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in _STATES:
            out[parts[0]] = _STATES[parts[1]]
    return out


def directive_value(text: str) -> str:
    """``text`` as one value of an ``#SBATCH`` line.

    sbatch splits those lines at blanks and ends them at an unescaped ``#``;
    inside double quotes, with a backslash before each backslash, double quote
    and ``#``, a value is read as it is (by old and current sbatch alike).
    Plain paths are left as they are.
    """
    if _PLAIN.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("#", "\\#")
    return f'"{escaped}"'


def parse_submit(text: str) -> str:
    """Read ``sbatch --parsable`` output: ``JOBID`` or ``JOBID;CLUSTER``."""
    job = text.strip().splitlines()[-1].split(";")[0].strip() if text.strip() else ""
    if not job.isdigit():
        raise ValueError(f"sbatch printed no job id: {text.strip()!r}")
    return job


class Slurm(Scheduler):
    """Worker jobs on a Slurm cluster."""

    name = "slurm"
    # squeue fails the whole list for one unknown id ("slurm_load_jobs error: Invalid job id
    # specified"); scancel says the same, or that the job is already done.
    no_such_job_words = ("Invalid job id specified",)
    gone_job_words = ("Invalid job id specified", "already completing or completed")

    def job_script(self) -> str:
        """The batch script of one worker job."""
        o = self.options
        lines = [
            "#!/bin/sh",
            "#SBATCH --job-name=wqs-worker",
            f"#SBATCH --output={directive_value(f'{self.workdir}/slurm-%j.out')}",
            "#SBATCH --ntasks=1",
            f"#SBATCH --cpus-per-task={o.cores}",
        ]
        if o.memory_mb:
            lines.append(f"#SBATCH --mem={o.memory_mb}M")
        if o.partition:
            lines.append(f"#SBATCH --partition={o.partition}")
        if o.account:
            lines.append(f"#SBATCH --account={o.account}")
        if o.walltime:
            lines.append(f"#SBATCH --time={o.walltime}")
        lines += list(o.directives)
        lines += ["", f"exec sh {shlex.quote(self.launcher_path or '')}", ""]
        return "\n".join(lines)

    async def submit(self, count: int) -> list[str]:
        """``sbatch --parsable`` the job script ``count`` times."""
        script = f"{self.workdir}/job.sh"
        return await self.submit_script(
            script,
            self.job_script(),
            count,
            ["sbatch", "--parsable", script],
            parse_submit,
            "check --partition, --account and --walltime against the cluster's limits",
        )

    def cancel_command(self, ids: Sequence[str]) -> list[str]:
        """``scancel`` the jobs."""
        return ["scancel", *ids]

    def state_command(self, ids: Sequence[str]) -> list[str]:
        """Every listed job of ours, from ``squeue -t all``."""
        return ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i %T"]

    def parse_states(self, text: str) -> dict[str, JobState]:
        """Read the output of :meth:`state_command`."""
        return parse_states(text)

    async def query(self, ids: Sequence[str]) -> dict[str, JobState]:
        """Our jobs in one squeue; one by one when it refused the list for an id it forgot."""
        done = await self.ask(self.state_command(ids), self.no_such_job_words)
        if done.returncode == 0:
            return parse_states(done.stdout)
        found: dict[str, JobState] = {}
        for job in ids:
            one = await self.ask(self.state_command([job]), self.no_such_job_words)
            if one.returncode == 0:
                found.update(parse_states(one.stdout))
        return found

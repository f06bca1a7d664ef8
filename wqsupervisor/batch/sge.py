"""Grid Engine (SGE, SoGE, UGE/AGE, OCS): ``qsub -terse``, ``qdel``, states from ``qstat -xml``.

One ``qsub`` per worker job; the script runs ``exec sh <launcher>`` under
``/bin/sh`` (``-S``), joins stderr to stdout (``-j y``) and writes it into the
private work directory (a directory as ``-o`` path gives
``wqs-worker.o<jobid>`` there). ``partition`` is the queue (``-q``),
``account`` the project (``-P``), ``walltime`` is ``-l h_rt=``; memory is
``-l h_vmem=`` per slot (Grid Engine counts it per slot, so ``memory_mb`` is
divided among the cores). More than one core needs a parallel environment,
whose name is the site's choice: ``-pe smp N`` is written unless a directive
already names one (``#$ -pe threads 8``). There is no standard disk request,
so ``disk_mb`` is not sent. Directives go in verbatim after these lines.

``qstat -xml`` lists the user's pending and running jobs; a finished job
leaves it at once, and only ``qacct`` (slow, and not always set up) would know
how it ended, so finished jobs are simply left out. The state codes
(qstat(1): d(eletion), E(rror), h(old), r(unning), R(estarted), s/S(uspended),
t(ransfering), T(hreshold), w(aiting), q(ueued)) combine, and are read in this
order:

* any ``d`` (``dr``, ``dt``, ``dRr``...) -> CANCELLED: deletion is under way;
* any ``E`` (``Eqw``) -> FAILED: the job cannot start (its reason is in
  ``qstat -j``). It stays queued until someone clears or deletes it, so
  :meth:`Sge.close` deletes those it saw;
* any ``h`` (``hqw``, ``hRwq``) -> PENDING: a user or dependency hold;
* any ``s``, ``S`` or ``T`` -> PENDING: a running job suspended, which holds
  no worker now and may resume;
* ``r`` or ``t`` (``r``, ``t``, ``Rr``, ``Rt``) -> RUNNING;
* ``q`` or ``w`` (``qw``, ``Rq``) -> PENDING.

Not run against a real Grid Engine here (none runs on the test machine): the
parsers are tested on published outputs (``tests/data/batch``), the adapter on
the exact command lines it sends. What happens when the head
node or the scheduler cannot be asked is tested for real: the commands fail
on a real head node (``tests/test_scheduler_unavailable.py``).
"""

from __future__ import annotations

import math
import re
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from .base import BatchOptions, JobState
from .qdel import QdelScheduler

_PE_DIRECTIVE = re.compile(r"^#\$\s+-pe\s")
# qsub -terse prints the id (arrays: 123.1-10:1); without -terse, "Your job 123 ("name") has been submitted".
_TERSE = re.compile(r"^(\d+)(\.\d+-\d+:\d+)?$")
_VERBOSE = re.compile(r"Your job(?:-array)? (\d+)")


def job_script(options: BatchOptions, workdir: str, launcher_path: str) -> str:
    """The Grid Engine batch script of one worker job."""
    lines = [
        "#!/bin/sh",
        "#$ -N wqs-worker",
        "#$ -S /bin/sh",
        "#$ -j y",
        f"#$ -o {workdir}/",
    ]
    if options.cores > 1 and not any(_PE_DIRECTIVE.match(line) for line in options.directives):
        lines.append(f"#$ -pe smp {options.cores}")
    if options.memory_mb:
        per_slot = math.ceil(options.memory_mb / max(options.cores, 1))
        lines.append(f"#$ -l h_vmem={per_slot}M")
    if options.walltime:
        lines.append(f"#$ -l h_rt={options.walltime}")
    if options.partition:
        lines.append(f"#$ -q {options.partition}")
    if options.account:
        lines.append(f"#$ -P {options.account}")
    lines += list(options.directives)
    return "\n".join([*lines, "", f"exec sh {shlex.quote(launcher_path)}", ""])


def parse_submit(text: str) -> str:
    """The job id in ``qsub -terse`` output (or in the longer "Your job N ... has been submitted")."""
    for line in reversed([line.strip() for line in text.splitlines() if line.strip()]):
        terse = _TERSE.match(line)
        if terse:
            return terse.group(1)
        verbose = _VERBOSE.search(line)
        if verbose:
            return verbose.group(1)
    raise ValueError(f"qsub printed no job id: {text.strip()!r}")


def job_state(code: str) -> JobState | None:
    """A ``qstat`` state code (``qw``, ``r``, ``Eqw``, ``dr``...) as a :class:`JobState`; None if unknown."""
    if "d" in code:
        return JobState.CANCELLED
    if "E" in code:
        return JobState.FAILED
    if "h" in code or any(letter in code for letter in "sST"):
        return JobState.PENDING
    if "r" in code or "t" in code:
        return JobState.RUNNING
    if "q" in code or "w" in code:
        return JobState.PENDING
    return None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_states(text: str) -> dict[str, JobState]:
    """Read ``qstat -xml`` output: {job number: state}; nothing if it is not XML."""
    if not text.strip():
        return {}
    try:
        root = ET.fromstring(text.strip())  # noqa: S314 - our own qstat's output, not a stranger's
    except ET.ParseError:
        return {}
    out: dict[str, JobState] = {}
    for node in root.iter():
        if _local(node.tag) != "job_list":
            continue
        fields = {_local(child.tag): (child.text or "").strip() for child in node}
        state = job_state(fields.get("state", ""))
        job = fields.get("JB_job_number", "")
        if job and state is not None:
            out[job] = state
    return out


class Sge(QdelScheduler):
    """Worker jobs on a Grid Engine cluster."""

    name = "sge"
    # qstat -xml lists the user's queued and running jobs, and no others: a job in error
    # (Eqw) waits there for a person, and close() deletes those it saw.
    failed_stay_queued = True

    def job_script(self) -> str:
        """The batch script of one worker job."""
        return job_script(self.options, *self.paths())

    async def submit(self, count: int) -> list[str]:
        """``qsub -terse`` the job script ``count`` times."""
        workdir, _ = self.paths()
        script = f"{workdir}/sge-job.sh"
        return await self.submit_script(
            script,
            self.job_script(),
            count,
            ["qsub", "-terse", script],
            parse_submit,
            f"check the queue, project, walltime and parallel environment in {script} "
            "('qconf -sql' and 'qconf -spl' list queues and parallel environments)",
        )

    def state_command(self, ids: Sequence[str]) -> list[str]:
        """``qstat -xml``: every job of the user (it takes no ids); ours are picked out of it."""
        return ["qstat", "-xml"]

    def parse_states(self, text: str) -> dict[str, JobState]:
        """Read the output of :meth:`state_command`."""
        return parse_states(text)

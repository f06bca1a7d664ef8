"""``qdel``: how PBS Professional, Torque and Grid Engine all cancel jobs.

The commands share a name and a purpose, and each family has its own words
for a job that is no longer there to cancel; those are no failure.
"""

from __future__ import annotations

from collections.abc import Sequence

from .scheduler import Scheduler


class QdelScheduler(Scheduler):
    """A scheduler whose jobs are cancelled with ``qdel``."""

    gone_job_words = (
        "Unknown Job Id",  # PBS Pro and Torque: "qdel: Unknown Job Id 7.pbs"
        "Job has finished",  # PBS Pro, a job kept in its history
        "Request invalid for state of job",  # PBS Pro: a job already exiting
        "Invalid state for job",  # Torque: a job already complete
        "does not exist",  # Grid Engine: 'denied: job "999" does not exist'
    )

    def cancel_command(self, ids: Sequence[str]) -> list[str]:
        """``qdel`` the jobs."""
        return ["qdel", *ids]

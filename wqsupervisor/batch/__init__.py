"""Where workers are started: one module per system, all behind :class:`BatchSystem`."""

from __future__ import annotations

import importlib

from .base import (
    BatchOptions,
    BatchSystem,
    Completed,
    JobState,
    LocalRunner,
    Runner,
    SshRunner,
    SubmitError,
    Unavailable,
)
from .scheduler import Scheduler

# name -> "module:Class"; imported on first use, so optional parts cost nothing.
SYSTEMS = {
    "local": "wqsupervisor.batch.local:Local",
    "ssh": "wqsupervisor.batch.ssh:HeadNodeWorkers",
    "slurm": "wqsupervisor.batch.slurm:Slurm",
    "condor": "wqsupervisor.batch.condor:Condor",
    "pbs": "wqsupervisor.batch.pbs:Pbs",
    "torque": "wqsupervisor.batch.pbs:Torque",
    "sge": "wqsupervisor.batch.sge:Sge",
    "factory": "wqsupervisor.batch.factory:Factory",
}


def system_class(name: str) -> type[BatchSystem]:
    """The class behind a system name (``slurm``, ``condor``...)."""
    from ..errors import ConfigError

    if name not in SYSTEMS:
        raise ConfigError(f"unknown worker system {name!r}", f"use one of: {', '.join(SYSTEMS)}")
    module, _, cls = SYSTEMS[name].partition(":")
    found: type[BatchSystem] = getattr(importlib.import_module(module), cls)
    return found


__all__ = [
    "SYSTEMS",
    "BatchOptions",
    "BatchSystem",
    "Completed",
    "JobState",
    "LocalRunner",
    "Runner",
    "Scheduler",
    "SshRunner",
    "SubmitError",
    "Unavailable",
    "system_class",
]

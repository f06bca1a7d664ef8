"""What each setting's value must be, whichever source gave it: one rule per setting.

:mod:`wqsupervisor.config` applies them where settings are read (flags, TOML,
the environment, keyword arguments); the checks themselves, with their
messages, are in :mod:`wqsupervisor.validation`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import validation as check
from .errors import ConfigError

# The worker systems ``workers=`` accepts. The registry that imports their
# classes is ``wqsupervisor.batch.SYSTEMS``; the names are kept here so that
# validating settings loads no batch code (a test keeps the two in step).
WORKER_SYSTEMS = ("local", "ssh", "slurm", "condor", "pbs", "torque", "sge", "factory")
# The transports' names (``backends.BACKENDS`` holds them; a test keeps the two alike).
BACKEND_NAMES = ("openssh", "resumable", "paramiko")


# Upper bounds for counts: far above any real use, low enough to refuse a typo's extra digits.
_MOST_WORKERS = 100_000
_MOST_CORES = 4096
_MOST_MB = 1 << 40


def _optional(rule: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    def checked(name: str, value: Any) -> None:
        if value is not None:
            rule(name, value)

    return checked


def _one_of(choices: tuple[str, ...], what: str) -> Callable[[str, Any], None]:
    def checked(name: str, value: Any) -> None:
        if value not in choices:
            raise ConfigError(f"unknown {what} {value!r}", f"use one of: {', '.join(choices)}")

    return checked


def _seconds(zero: bool = False) -> Callable[[str, Any], None]:
    return lambda name, value: check.seconds(name, value, zero=zero)


def _count(low: int, high: int, meaning: str = "") -> Callable[[str, Any], None]:
    return lambda name, value: check.count(name, value, low, high, meaning)


def _ssh_options(_name: str, value: Any) -> None:
    for key, text in value:
        if not isinstance(key, str) or not key or not key.isalnum() or not isinstance(text, str):
            raise ConfigError(
                f"ssh option {key}={text!r} is malformed",
                "write it as KEY=VALUE, e.g. ServerAliveInterval=15",
            )
        check.text(f"ssh option {key}", text, "a value")


def _batch_env(name: str, value: Any) -> None:
    for key, text in value:
        check.env_name(name, key)
        if text:
            check.text(f"{name} {key}", text, "a value")


def _directives(name: str, value: Any) -> None:
    for line in value:
        check.text(name, line, "a line of the job script")


def _batch_word(example: str) -> Callable[[str, Any], None]:
    return _optional(lambda name, value: check.batch_word(name, value, example))


def _each(rule: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    def checked(name: str, value: Any) -> None:
        for item in value:
            rule(name, item)

    return checked


# One rule per setting: what its value must be, whichever source gave it.
RULES: dict[str, Callable[[str, Any], None]] = {
    "via": _optional(check.host),
    "also_via": _each(check.host),
    "remote_port": _optional(lambda name, value: check.port(name, value, low=0)),
    "ssh_port": _optional(check.port),
    "identity": _optional(lambda name, value: check.text(name, value, "a file path")),
    "ssh_options": _ssh_options,
    "ssh_config": _optional(lambda name, value: check.text(name, value, "a file path")),
    "ssh_program": check.program,
    "remote_bind": lambda name, value: check.word(name, value, "an address"),
    "backend": _one_of(BACKEND_NAMES, "backend"),
    "resume": check.switch,
    "resume_hop": check.switch,
    "node_python": check.program,
    "relay_linger": _seconds(),
    "relay_python": check.program,
    "own_socket": check.switch,
    "password_file": _optional(lambda name, value: check.text(name, value, "a file path")),
    "allow_no_password": check.switch,
    "ssl": check.switch,
    "metrics_port": _optional(check.port),
    "metrics_host": lambda name, value: check.word(name, value, "an address"),
    "keepalive_interval": _seconds(),
    "stall_after": _seconds(),
    "master_timeout": _count(0, check.LONGEST_SECONDS, " (leave the master's own)"),
    "probe_interval": _seconds(),
    "stats_interval": _seconds(),
    "connect_timeout": _seconds(),
    "start_attempts": _count(0, 1_000_000, " (no bound)"),
    "stable_after": _seconds(zero=True),
    "backoff_initial": _seconds(zero=True),
    "backoff_cap": _seconds(),
    "log_format": _one_of(("console", "json"), "log format"),
    "workers": _optional(_one_of(WORKER_SYSTEMS, "worker system")),
    "min_workers": _count(0, _MOST_WORKERS),
    "max_workers": _count(1, _MOST_WORKERS),
    "tasks_per_worker": _count(1, _MOST_WORKERS),
    "max_pending": _count(1, _MOST_WORKERS),
    "max_per_cycle": _count(1, _MOST_WORKERS),
    "scale_cooldown": _seconds(zero=True),
    "idle_time": _seconds(zero=True),
    "factory_type": check.factory_type,
    "worker_cores": _count(1, _MOST_CORES),
    "worker_memory": _optional(_count(1, _MOST_MB)),
    "worker_disk": _optional(_count(1, _MOST_MB)),
    "worker_program": _optional(check.program),
    "factory_program": _optional(check.program),
    "node_via": _optional(check.host),
    "also_node_via": _each(check.host),
    "node_ssh_args": _optional(check.shell_words),
    "partition": _batch_word("gpu"),
    "account": _batch_word("proj42"),
    "walltime": _batch_word("02:00:00"),
    "batch_directives": _directives,
    "batch_env": _batch_env,
}

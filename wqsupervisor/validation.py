"""The rules a setting's value must meet, whichever source it came from.

Pure checks: each takes a setting's name and value and raises
:class:`~wqsupervisor.errors.ConfigError` that says what is wrong and what
would be accepted. Values end up in ssh command lines, job scripts and
HTCondor submit descriptions, so a name that carries a line break, or a word
that starts with ``-``, could become a line or an option of its own there;
these checks refuse them where they are read, not where they would do harm.
"""

from __future__ import annotations

import math
import re
import shlex
from typing import Any

from .errors import ConfigError

# Longer than any sane interval or timeout, short enough for every timer and sleep.
LONGEST_SECONDS = 30 * 86400
# Control characters, C0, DEL and C1: none belongs in a name, a path or a script line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Partitions, queues, accounts, wall times: words the schedulers know, nothing a
# job script or a submit description would read as syntax.
_BATCH_WORD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,:@+=/-]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FACTORY_TYPE = re.compile(r"[a-z][a-z0-9_-]*")


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def text(name: str, value: Any, what: str = "text") -> None:
    """A non-empty string without control characters (line breaks included)."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be {what}, not {_shown(value)}")
    if not value:
        raise ConfigError(f"{name} is empty", f"give {what}, or leave the setting out")
    if _CONTROL.search(value):
        raise ConfigError(
            f"{name} {value!r} contains a control character (a line break, a tab...)",
            "write it on one line, without control characters",
        )


def word(name: str, value: Any, what: str) -> None:
    """One word: text without whitespace that cannot be read as an option (no leading ``-``)."""
    text(name, value, what)
    if value.startswith("-") or any(c.isspace() for c in value):
        raise ConfigError(
            f"{name} {value!r} is not {what}", "it must be one word that does not start with '-'"
        )


def program(name: str, value: Any) -> None:
    """A program to run: a name or a path (spaces allowed), not something that reads as an option."""
    text(name, value, "a program")
    if value.startswith("-"):
        raise ConfigError(f"{name} {value!r} is not a program", "give its name or its path")


def host(name: str, value: Any) -> None:
    """An ssh destination, ``[USER@]HOST`` or an alias: one word that ssh cannot take for an option."""
    if not isinstance(value, str) or not value.strip() or value.startswith("-") or _CONTROL.search(value):
        raise ConfigError(
            f"{name} {value!r} is not a host name", "use [USER@]HOST, e.g. alice@login.cluster.edu"
        )
    if any(c.isspace() for c in value):
        raise ConfigError(
            f"{name} {value!r} is not a host name", "use [USER@]HOST, e.g. alice@login.cluster.edu"
        )


def batch_word(name: str, value: Any, example: str) -> None:
    """A partition, queue, account or wall time: letters, digits and ``_.,:@+=/-``, no leading ``-``."""
    text(name, value, "a name")
    if not _BATCH_WORD.fullmatch(value):
        raise ConfigError(
            f"{name} {value!r} is not a name the batch system can take",
            f"use letters, digits and _.,:@+=/- only, not starting with '-' (e.g. {example})",
        )


def factory_type(name: str, value: Any) -> None:
    """A ``work_queue_factory -T`` batch type: a lower-case word."""
    if not isinstance(value, str) or not _FACTORY_TYPE.fullmatch(value):
        raise ConfigError(
            f"{name} {_shown(value)} is not a batch type",
            "use work_queue_factory's -T names: local, slurm, condor...",
        )


def env_name(name: str, key: Any) -> None:
    """An environment variable's name (so that ``env KEY=VALUE`` cannot take it for an option)."""
    if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
        raise ConfigError(
            f"{name}: {_shown(key)} is not an environment variable name",
            "write KEY=VALUE with KEY made of letters, digits and _, e.g. SLURM_CONF=/etc/slurm/slurm.conf",
        )


def shell_words(name: str, value: Any) -> None:
    """Arguments written as a shell would split them (balanced quotes, one line)."""
    text(name, value, "arguments")
    try:
        shlex.split(value)
    except ValueError as exc:
        raise ConfigError(
            f"{name} {value!r} cannot be split into arguments: {exc}", "balance its quotes"
        ) from None


def switch(name: str, value: Any) -> None:
    """On or off: a bool, nothing else (``"no"`` would otherwise count as on)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, not {_shown(value)}")


def _number(name: str, value: Any, kind: type) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        ok = ok and isinstance(value, int)
    if not ok:
        raise ConfigError(f"{name} must be a {'whole ' if kind is int else ''}number, not {_shown(value)}")


def port(name: str, value: Any, low: int = 1) -> None:
    """A TCP port number, ``low`` (1, or 0 where 0 means "pick one") to 65535."""
    _number(name, value, int)
    if not low <= value <= 65535:
        raise ConfigError(f"{name} {value} is not a TCP port", f"use a number from {low} to 65535")


def seconds(name: str, value: Any, *, zero: bool = False) -> None:
    """A finite duration in seconds: above 0 (or 0 too, with ``zero``), at most :data:`LONGEST_SECONDS`."""
    _number(name, value, float)
    accepted = (
        f"use a number of seconds {'from 0' if zero else 'above 0'}, at most {LONGEST_SECONDS} (30 days)"
    )
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number of seconds, not {value}", accepted)
    if value < 0 or (value == 0 and not zero):
        raise ConfigError(f"{name} must be {'0 or more' if zero else 'positive'}, not {value}", accepted)
    if value > LONGEST_SECONDS:
        raise ConfigError(f"{name} {value} s is more than {LONGEST_SECONDS} s (30 days)", accepted)


def count(name: str, value: Any, low: int, high: int, meaning: str = "") -> None:
    """A whole number from ``low`` to ``high``; ``meaning`` explains the low end when it is special."""
    _number(name, value, int)
    if value < low:
        raise ConfigError(
            f"{name} must be {low}{meaning} or more, not {value}", f"use a whole number from {low} to {high}"
        )
    if value > high:
        raise ConfigError(
            f"{name} must be at most {high}, not {value}", f"use a whole number from {low} to {high}"
        )

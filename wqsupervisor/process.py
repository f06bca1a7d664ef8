"""Owning child processes: they die with their parent and are always reaped.

On Linux every child is started through ``setpriv --pdeathsig``, so the
kernel signals it when the thread that started it dies, SIGKILL of the parent
included. Elsewhere the children rely on the pipes their parent holds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def owned_argv(argv: Sequence[str], death_signal: str = "TERM") -> list[str]:
    """``argv`` wrapped so that the child gets ``death_signal`` when its parent dies."""
    if _SETPRIV is None:
        return list(argv)
    return [_SETPRIV, f"--pdeathsig={death_signal}", "--", *argv]


def has_death_signal() -> bool:
    """True when children started through :func:`owned_argv` die with their parent."""
    return _SETPRIV is not None


def terminate(proc: subprocess.Popen[bytes], grace: float = 3.0) -> int | None:
    """Stop ``proc`` (SIGTERM, then SIGKILL after ``grace``) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return proc.returncode


async def reap(proc: asyncio.subprocess.Process, grace: float) -> None:
    """Wait up to ``grace`` for ``proc`` (asked to stop already) to exit, then SIGKILL it; reaped."""
    import asyncio  # here: importing the package must not load asyncio (the drop-in's script)

    if proc.returncode is not None:
        return
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait until every pid is gone; return the ones still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def exit_status(returncode: int) -> int:
    """A shell-style exit status: a death by signal N becomes 128 + N."""
    return 128 - returncode if returncode < 0 else returncode

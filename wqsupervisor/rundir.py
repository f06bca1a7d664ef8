"""Run directories: the private scratch space of one engine, gone when it ends, however it ends.

An engine keeps its fd-passing helper, probe sockets and (for ``run``) its
control socket in a directory of its own under the temporary directory,
named ``wqs-<pid>-XXXXXXXX`` after the process that created it (mode 0700).
Whoever outlives the engine removes it: the engine on a clean exit, the
drop-in handle when its agent dies. When both were killed at once, the next
directory created on this machine sweeps it away: a run directory of this
user whose creator is no longer running belongs to nobody.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from . import privatedir


def create(label: str = "") -> str:
    """A new run directory for this process (0700), after sweeping the ones whose creator is gone.

    ``label`` goes into its name (``wqs-<pid>-<label>-...``), to say what it holds.
    """
    sweep()
    return tempfile.mkdtemp(prefix=f"wqs-{os.getpid()}-{label + '-' if label else ''}")


def remove(path: str) -> None:
    """Remove a run directory and everything in it (it may already be gone)."""
    shutil.rmtree(path, ignore_errors=True)


def sweep(base: str | None = None) -> list[str]:
    """Remove this user's run directories whose creating process has exited; returns what went."""
    return privatedir.sweep_orphans(Path(base or tempfile.gettempdir()), "wqs-", directories=True)

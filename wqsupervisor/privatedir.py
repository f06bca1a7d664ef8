"""Directories of the user's own, and the leftovers of processes that died in them.

Everything the package keeps on disk (generated passwords, status sockets,
caches) lives in such a directory. One that exists already is used only when
it is a real directory (not a symlink) owned by this user; its mode is then
put back to 0700. Another user's directory is never used, nor re-moded: it
could lead a secret out, or code in.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

from .errors import WQSupervisorError

MODE = 0o700


def ensure(path: Path, what: str, hint: str) -> Path:
    """``path`` as a private directory of this user, made (with its parents) if missing.

    ``what`` names it in errors ("the runtime directory"), ``hint`` says what
    to do instead; raises :class:`WQSupervisorError` when it cannot be made, is
    not a directory, or belongs to another user.
    """
    try:
        path.mkdir(mode=MODE, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise WQSupervisorError(f"cannot create {what} {path}: {exc.strerror}", hint) from None
    if not stat.S_ISDIR(info.st_mode):
        raise WQSupervisorError(f"{what} {path} is not a directory", f"remove it, or {hint}")
    if info.st_uid != os.getuid():
        raise WQSupervisorError(
            f"{what} {path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()})",
            f"remove it, or {hint}",
        )
    if stat.S_IMODE(info.st_mode) != MODE:
        os.chmod(path, MODE)
    return path


def sweep_orphans(directory: Path, prefix: str, *, directories: bool) -> list[str]:
    """Remove what was named ``<prefix><pid>-...`` by a process of this user that is gone.

    Only entries of the kind asked for (directories, or regular files) that
    belong to this user go; a symlink never does, nor anything whose creator
    (or a process that reuses its pid) still runs. Returns what was removed.
    """
    name = re.compile(re.escape(prefix) + r"(\d+)-.+")
    gone = []
    for entry in directory.glob(f"{prefix}*"):
        match = name.fullmatch(entry.name)
        if match is None:
            continue
        try:
            info = entry.lstat()
        except OSError:
            continue
        kind_ok = stat.S_ISDIR(info.st_mode) if directories else stat.S_ISREG(info.st_mode)
        if not kind_ok or info.st_uid != os.getuid() or Path(f"/proc/{match.group(1)}").exists():
            continue
        if directories:
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        gone.append(str(entry))
    return gone

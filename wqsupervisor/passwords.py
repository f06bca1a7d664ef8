"""The Work Queue password: made, checked, set on the master, and kept out of every log.

A reverse tunnel puts the master's port on the head node's loopback, where
every user of that shared machine can connect; without a password anyone
there can join as a worker or read the queue. So a tunnel is refused for a
master without a password unless the user opts out (``allow_no_password``).

``password_file`` names the file master, workers and probes share. A path
that does not exist yet is created with a fresh random password (0600, never
overwritten); ``"auto"`` creates one in a private directory. The file must
not be readable by anyone else: Work Queue reads it as it is, trailing
newline included, and so do the supervisor's probes.
"""

from __future__ import annotations

import os
import secrets
import shlex
import stat
import tempfile
from pathlib import Path
from typing import Any

from . import privatedir
from .errors import ConfigError, WQSupervisorError
from .logs import register_secret

AUTO = "auto"
_AUTO_PREFIX = "wq-password-"


def private_dir() -> Path:
    """``~/.wqsupervisor`` (0700): where generated passwords live."""
    hint = "give --password-file a path of your own instead of 'auto', or set HOME"
    try:
        return privatedir.ensure(Path.home() / ".wqsupervisor", "the password directory", hint)
    except WQSupervisorError as exc:
        raise ConfigError(exc.message, exc.hint) from None


def create_password_file(path: str | os.PathLike[str] | None = None) -> Path:
    """Write a new random password to ``path`` (or a fresh file in :func:`private_dir`), mode 0600.

    The file appears whole or not at all, and an existing file is never replaced.
    """
    if path is None:
        # Named after this process, so that the next one can tell a file nobody will remove.
        home = private_dir()
        privatedir.sweep_orphans(home, _AUTO_PREFIX, directories=False)
        fd, name = tempfile.mkstemp(prefix=f"{_AUTO_PREFIX}{os.getpid()}-", dir=home)
        os.close(fd)
        target = Path(name)
        target.unlink()
    else:
        target = Path(path)
    password = secrets.token_urlsafe(32) + "\n"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".wq-password-", dir=target.parent)
    except OSError as exc:
        raise ConfigError(
            f"cannot create password file {target}: {exc.strerror}",
            "give a path in a directory you can write to",
        ) from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(password)
        os.chmod(tmp, 0o600)
        os.link(tmp, target)  # fails if the target exists: nothing is overwritten
    except FileExistsError:
        raise ConfigError(
            f"password file {target} already exists", "use it, or choose another path"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot create password file {target}: {exc.strerror}",
            "give a path on a file system that allows hard links and that you can write to",
        ) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    register_secret(password)
    return target


def read_password(path: str | os.PathLike[str]) -> bytes:
    """The password in ``path``, after checking nobody else can read it."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(
            f"password file {p} does not exist",
            "give an existing file, or let wqsupervisor create it: a path that does not exist yet is created",
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read password file {p}: {exc.strerror}", "check its permissions") from None
    if not stat.S_ISREG(mode):
        raise ConfigError(
            f"password file {p} is not a regular file",
            "give a file only you can read, or a path that does not exist yet (it is then created)",
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"password file {p} can be read by other users (mode {stat.filemode(mode)})",
            f"chmod 600 {shlex.quote(str(p))}",
        )
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read password file {p}: {exc.strerror}", "check its permissions") from None
    if not data.strip():
        raise ConfigError(
            f"password file {p} is empty", "put a password in it, or let wqsupervisor create one"
        )
    register_secret(data)
    return data


def prepare(settings: Any, master: Any) -> Any:
    """Make sure the master has a password (or the user opted out); returns the settings to use.

    Creates the file when asked to, checks it, and sets it on the master with
    ``specify_password_file`` (``set_password_file`` on a TaskVine manager).
    Raises :class:`ConfigError` with what to do.
    """
    path = settings.password_file
    if path is None:
        if settings.allow_no_password:
            return settings
        # (master is None when the command line checks the settings before the script starts.)
        raise ConfigError(
            "refusing to open a tunnel for a master without a password: every user of the head node "
            "could join as a worker or read the queue through the forwarded port",
            "pass password_file=PATH (created if missing, or 'auto'), or allow_no_password=True "
            "(--password-file / --allow-no-password)",
        )
    if path == AUTO:
        path = str(create_password_file())
    elif not Path(path).exists():
        create_password_file(path)
    read_password(path)
    if master is None:
        return settings
    # Work Queue's name for it, then TaskVine's.
    setter = getattr(master, "specify_password_file", None) or getattr(master, "set_password_file", None)
    if not callable(setter):
        raise ConfigError(
            f"{type(master).__name__} cannot take a password",
            "use a master that can (ndcctools' WorkQueue or TaskVine Manager), or allow_no_password=True",
        )
    accepted = setter(str(path))
    if accepted is not None and not accepted:
        raise ConfigError(f"the master refused password file {path}", "check that the file is readable")
    return settings.replace(password_file=str(Path(path).resolve()))

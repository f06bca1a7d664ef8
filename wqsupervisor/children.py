"""What a script's child processes listen on: masters ``run`` cannot wrap, for ``attach``.

``run`` supervises every master made in a Python process of the script's (see
:mod:`wqsupervisor._bootstrap`). A master of another language that the script
starts (``work_queue_server``, ``makeflow -T wq``, a C program) is a process
listening on a TCP port; :func:`listening_descendants` finds such ports by
reading ``/proc``, so that the run can say at once what it found.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Listener:
    """A descendant process listening on a TCP port."""

    pid: int
    command: str
    port: int


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def comm(pid: int) -> str:
    """The name of process ``pid`` (/proc/PID/comm), "" when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (not ``pid`` itself)."""
    tree = _children()
    found: list[int] = []
    todo = list(tree.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(tree.get(child, []))
    return found


def _listening_inodes() -> dict[str, int]:
    """Socket inode -> port, for every TCP socket listening on this machine."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A":
                    inodes[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    return inodes


def port_listening(port: int) -> bool:
    """Whether a TCP socket of this machine (this network namespace) listens on ``port``.

    Read from ``/proc``, without connecting: a connection would be one more peer for
    the master to authenticate, and a master with a password logs every one that
    leaves without a word ("presented the wrong password").
    """
    return port in _listening_inodes().values()


def listening_descendants(pid: int) -> list[Listener]:
    """The TCP ports that processes below ``pid`` listen on, each once."""
    inodes = _listening_inodes()
    found: dict[int, Listener] = {}
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            fds = os.listdir(f"/proc/{child}/fd")
            with open(f"/proc/{child}/comm") as fh:
                command = fh.read().strip()
            for fd in fds:
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{child}/fd/{fd}")
                    if target.startswith("socket:[") and target[8:-1] in inodes:
                        port = inodes[target[8:-1]]
                        found.setdefault(port, Listener(child, command, port))
    return sorted(found.values(), key=lambda listener: listener.port)

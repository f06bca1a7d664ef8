"""The head relay as one program, and the remote command that runs it from the session's stdin.

Nothing is installed on the head node: the session's remote command greets
(as every session's does), then starts ``python3`` with a few lines that read
the program from stdin, exactly :func:`source`'s length, and run it; the rest
of stdin is the relay's frames. The program is :mod:`wire`, :mod:`core` and
:mod:`headmain` joined (their relative imports dropped), so the head runs the
very code the tests exercise. :func:`check_syntax` holds it to Python 3.6.
"""

from __future__ import annotations

import ast
import functools
import shlex
from pathlib import Path

from .headmain import BOOTSTRAP

__all__ = ["BOOTSTRAP", "check_syntax", "remote_command", "source"]

_PARTS = ("wire.py", "core.py", "headmain.py")


@functools.cache
def source() -> bytes:
    """The head relay program, ready to be sent."""
    here = Path(__file__).parent
    lines: list[str] = []
    for name in _PARTS:
        for line in (here / name).read_text().splitlines():
            if line.startswith(("from .", "from __future__")):
                continue
            lines.append(line)
    lines.append("main(sys.argv[2:])")
    return ("\n".join(lines) + "\n").encode()


def check_syntax(version: tuple[int, int] = (3, 6)) -> None:
    """Raise SyntaxError when the program would not parse on Python ``version``."""
    ast.parse(source(), feature_version=version)


def remote_command(python: str, bind: str, port: int, linger: float) -> str:
    """The session's remote command: greet with the sshd session's pid, then run the relay."""
    inner = (
        f"echo wqs-session $PPID; exec {shlex.quote(python)} -c {shlex.quote(BOOTSTRAP)} "
        f"{len(source())} {shlex.quote(bind)} {port} {linger:g}"
    )
    return f"exec sh -c {shlex.quote(inner)}"

"""The agent: the engine in a process of its own, for the drop-in wrapper.

Started by :class:`wqsupervisor.Supervisor` with one end of a socketpair. It
serves that one connection and exits when it closes, which the kernel does
for us however the application ends, SIGKILL included. Its ssh children get
SIGTERM from the kernel if the agent itself is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys

from . import rundir as rundirs
from .engine import MAX_REQUEST, Engine


async def _serve(sock: socket.socket, rundir: str) -> None:
    engine = Engine(rundir=rundir)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_REQUEST)
    await engine.serve_status()
    serving = asyncio.create_task(engine.serve_connection(reader, writer))
    loop.add_signal_handler(signal.SIGTERM, serving.cancel)
    loop.add_signal_handler(signal.SIGHUP, serving.cancel)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    finally:
        await engine.close()
        rundirs.remove(rundir)


def main(argv: list[str] | None = None) -> int:
    """Serve the inherited socket FD, keeping scratch files in the run directory RUNDIR."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[0].isdigit() or not os.path.isdir(args[1]):
        print(
            "usage: python -m wqsupervisor.agent FD RUNDIR (started by wqsupervisor, not by hand)",
            file=sys.stderr,
        )
        return 2
    # Ctrl-C belongs to the application, which closes us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(args[0]))
    asyncio.run(_serve(sock, args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Our own multiplexed ssh connection to the head node, for the scheduler's commands.

Every ``sbatch``, ``squeue`` and ``scancel`` used to pay for a TCP connection,
a key exchange and an authentication of its own: a few hundred milliseconds on
a campus network, more across the country, before the scheduler even heard of
the job. :class:`ControlConnection` keeps one OpenSSH master connection
(``ssh -M -N -S SOCKET``) open beside the tunnel, never the tunnel's own: the
commands then run as new sessions on it (``ssh -S SOCKET``), in one round trip.

* It is ours alone: a socket in the engine's private run directory, a process
  started through :func:`~wqsupervisor.process.owned_argv` (it dies with the
  agent, SIGKILL included), ``ControlPersist=no`` (it never daemonises), and
  :meth:`close` ends it.
* It is never needed: a command whose master is not up (not started yet, the
  head node unreachable, the master dead and its socket stale) connects by
  itself, as before, so a dead master costs speed, not answers. A command that
  timed out or could not reach the head node ends the master, and the next
  command starts a new one: a master on a broken connection would otherwise
  hold every command until its keepalives gave up.
* Its keepalives are short (5 s, 3 missed), unlike the tunnel's, whose
  patience is the supervisor's to decide: this connection carries only
  commands, which are retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from ..logs import get_logger
from ..openssh import base_argv
from ..process import owned_argv, reap
from ..target import SshTarget

_POLL = 0.01


class ControlConnection:
    """One ssh master connection to ``target``, its socket at ``path``, started on first use."""

    def __init__(self, target: SshTarget, path: str) -> None:
        self.target = target
        self.path = path
        self._proc: asyncio.subprocess.Process | None = None
        self._starting: asyncio.Lock | None = None
        self.starts = 0
        """How many masters were started (a restart follows a failure)."""

    def argv(self) -> list[str]:
        """The master's command line: the tunnel's ssh options, no forwards, no session."""
        argv = base_argv(self.target)
        # ssh keeps the first value of an option: ours come before the user's and the defaults.
        argv[1:1] = [
            "-M",
            "-S",
            self.path,
            "-N",
            "-o",
            "ControlPersist=no",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=3",
        ]
        return [*argv, self.target.destination]

    def client_options(self) -> list[str]:
        """What a command adds to use the master (``-S SOCKET``); without a master it connects by itself."""
        return ["-S", self.path]

    @property
    def running(self) -> bool:
        """True while the master process lives."""
        return self._proc is not None and self._proc.returncode is None

    async def ready(self) -> bool:
        """Start the master if it is not running, and wait until its socket is there; False if it failed.

        A failure is not raised: the command that asked connects by itself
        and reports what ssh says.
        """
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.running and os.path.exists(self.path):
                return True
            await self._stop()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a master that died leaves its socket
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *owned_argv(self.argv()),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as exc:
                get_logger().warning("batch.control_failed", error=str(exc))
                return False
            self.starts += 1
            deadline = asyncio.get_running_loop().time() + self.target.connect_timeout + 1
            while asyncio.get_running_loop().time() < deadline:
                if os.path.exists(self.path):
                    return True
                if self._proc.returncode is not None:
                    break
                await asyncio.sleep(_POLL)
            await self._stop()
            return False

    def failed(self) -> None:
        """A command through the master timed out or could not reach the head: end the master now."""
        if self.running:
            assert self._proc is not None
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            await reap(proc, 3)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def close(self) -> None:
        """End the master and remove its socket."""
        await self._stop()

"""Exec channels on the head node, for :class:`~wqsupervisor.batch.paramiko_runner.ParamikoRunner`.

Each function here blocks and runs in a thread of the runner's: one command
to its end (:func:`exec_blocking`), or one that lasts as long as a job
(:func:`open_lasting`, followed by :class:`ChannelJob`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import paramiko

from ..paramiko_connect import drain_channel
from ..paramiko_threads import SessionThreads
from .base import SSH_FAILED, Completed

_CHUNK = 65536
# How long an ended channel may take to deliver the exit status that precedes its close.
_STATUS_WAIT = 5.0


class NotStarted(Exception):
    """The channel could not be opened: the command never ran, so running it again is safe."""


def exec_blocking(
    transport: Any, command: str, stdin: bytes, timeout: float, program: str, opened: list[Any]
) -> Completed:
    """Run ``command`` on an exec channel of ``transport``, giving up (and closing it) after ``timeout``."""
    deadline = time.monotonic() + timeout
    if not transport.is_active():
        raise NotStarted("the connection is closed")
    try:
        chan = transport.open_session(timeout=max(0.1, deadline - time.monotonic()))
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise NotStarted(str(exc) or type(exc).__name__) from None
    opened.append(chan)
    with chan:
        chan.exec_command(command)
        if stdin:
            chan.settimeout(max(0.1, deadline - time.monotonic()))
            chan.sendall(stdin)
        chan.shutdown_write()
        out, err = bytearray(), bytearray()
        if not drain_channel(chan, deadline, out, err):
            return timed_out(program, timeout)
        if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
            return timed_out(program, timeout)
        if chan.exit_status < 0:
            # A dying connection closes its channels just before it marks itself dead.
            transport.join(0.5)
            if not transport.is_active():
                raise EOFError("the connection closed while the command ran")
        status = chan.exit_status
    return Completed(
        # No exit status (killed by a signal): 255, as ssh itself exits then.
        status if status >= 0 else SSH_FAILED,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
    )


def timed_out(program: str, timeout: float) -> Completed:
    """What a command cut at its timeout ends with."""
    # The program's name only, as SshRunner says it: the command line holds batch_env's values.
    return Completed(124, "", f"{program} timed out after {timeout:g} s on the head node", timed_out=True)


def close_channel(chan: Any) -> None:
    """Close ``chan``, whatever state it (or its connection) is in."""
    with contextlib.suppress(Exception):
        chan.close()


def open_lasting(transport: Any, command: str, timeout: float) -> Any:
    """An exec channel running ``command``, its input left open."""
    if not transport.is_active():
        raise NotStarted("the connection is closed")
    try:
        chan = transport.open_session(timeout=timeout)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise NotStarted(str(exc) or type(exc).__name__) from None
    try:
        chan.exec_command(command)
    except BaseException:
        close_channel(chan)
        raise
    return chan


class _Input:
    """A channel's input: :meth:`close` sends end of file (in a thread: it may wait on the transport)."""

    def __init__(self, chan: Any, threads: SessionThreads) -> None:
        self._chan = chan
        self._threads = threads

    def close(self) -> None:
        self._threads.spawn(self._eof, name="wqs-runner-eof")

    def _eof(self) -> None:
        with contextlib.suppress(Exception):
            self._chan.shutdown_write()


class ChannelJob:
    """A command on an exec channel, lasting as long as a job: what :class:`Processes` needs of a process.

    Closing its input sends end of file, which the head-node wrappers
    (:mod:`~wqsupervisor.batch.ssh`, :mod:`~wqsupervisor.batch.factory`) read
    as "stop the job"; :meth:`send_signal` and :meth:`kill` close the channel,
    which sshd passes on the same way (it closes the command's input), as it
    does when the connection is lost or this process dies. Its output is read
    and dropped, so that it never fills the channel's window.
    """

    def __init__(self, serial: int, chan: Any, threads: SessionThreads) -> None:
        self.pid = serial
        self.returncode: int | None = None
        self.stdin = _Input(chan, threads)
        self._chan = chan
        self._threads = threads
        self._ended: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"exited {self.returncode}"
        return f"<ChannelJob {self.pid} {state}>"

    def follow(self) -> None:
        """In a thread: read the channel until it ends, then record the exit status."""
        try:
            drain_channel(self._chan, None, None, None)
            self._chan.status_event.wait(_STATUS_WAIT)
            status = int(self._chan.exit_status)
        except Exception:
            status = -1
        finally:
            close_channel(self._chan)
        # No exit status (killed, the channel closed, the connection lost): 255, as ssh exits then.
        self._threads.post(self._end, status if status >= 0 else SSH_FAILED)

    def _end(self, code: int) -> None:
        self.returncode = code
        if not self._ended.done():
            self._ended.set_result(code)

    def send_signal(self, sig: int) -> None:
        """End the job: close its channel."""
        self._threads.spawn(close_channel, self._chan, name="wqs-runner-close")

    def kill(self) -> None:
        """End the job: close its channel."""
        self.send_signal(0)

    async def wait(self) -> int:
        """Wait until the channel has ended; the command's exit status (255 without one)."""
        return await asyncio.shield(self._ended)

"""The tunnels a benchmark compares: the supervised one, and the HOWTO's plain ssh or autossh."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any

from ...children import comm, descendants
from ...master import MasterInfo
from ...process import owned_argv, terminate
from ...runapp import EngineThread
from ...wqserver import free_port
from ..sandbox import ALIAS, HeadNode


class Supervised:
    """The supervised tunnel (the engine the ``run`` command uses) for one master.

    Plain forwarding (``resume=False``) unless ``options`` name a backend or
    resumption: the benchmarks compare the relay with the session it wraps.
    """

    name = "wqsupervisor"

    def __init__(
        self, head: HeadNode, master_port: int, remote_port: int | None = None, **options: Any
    ) -> None:
        self.remote_port = remote_port or free_port()
        if "backend" not in options:
            options.setdefault("resume", False)
        self.options = options
        self.host = EngineThread(log=False)
        self.sup = self.host.call(self._attach(head, master_port))
        if not self.host.call(self._up(), timeout=60):
            raise RuntimeError("the supervised tunnel did not come up")

    async def _attach(self, head: HeadNode, master_port: int) -> Any:
        settings = head.settings(remote_port=self.remote_port, allow_no_password=True, **self.options)
        return self.host.engine.attach(MasterInfo(port=master_port, name="wqs-bench"), settings)

    async def _up(self) -> bool:
        try:
            await asyncio.wait_for(self.sup.tunnel.up_event.wait(), 30)
        except TimeoutError:
            return False
        return True

    def ssh_pid(self) -> int:
        pid = self.host.snapshot().masters[0].tunnel.ssh_pid
        assert pid is not None
        return pid

    def close(self) -> None:
        self.host.stop()


class PlainSsh:
    """The HOWTO's ``ssh -N -R`` (``session=True``: the same forward with a waiting remote command)."""

    def __init__(
        self,
        head: HeadNode,
        master_port: int,
        *,
        session: bool = False,
        autossh: bool = False,
        options: Sequence[str] = (),
    ) -> None:
        self.remote_port = free_port()
        self.name = "autossh" if autossh else ("ssh -T -R cat" if session else "ssh -N -R")
        argv = [
            "-F",
            str(head.ssh_config),
            *options,
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            f"127.0.0.1:{self.remote_port}:localhost:{master_port}",
        ]
        argv += ["-T", ALIAS, "cat"] if session else ["-N", ALIAS]
        if autossh:
            exe = shutil.which("autossh")
            if exe is None:
                raise RuntimeError("autossh is not installed (apt-get install autossh)")
            env = dict(os.environ, AUTOSSH_GATETIME="0", AUTOSSH_POLL="600")
            self.proc = subprocess.Popen(
                owned_argv([exe, "-M", "0", *argv]),
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        else:
            self.proc = subprocess.Popen(
                owned_argv(["ssh", *argv]),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while not _listening(self.remote_port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} did not open port {self.remote_port}")
            time.sleep(0.01)

    def ssh_pid(self) -> int:
        if self.name != "autossh":
            return self.proc.pid
        kids = [p for p in descendants(self.proc.pid) if comm(p) == "ssh"]
        if not kids:
            raise RuntimeError("autossh has no ssh child")
        return kids[0]

    def close(self) -> None:
        terminate(self.proc, grace=3)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False

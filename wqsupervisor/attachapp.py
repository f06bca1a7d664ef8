"""``python -m wqsupervisor attach --master-port PORT``: supervise a master that is already listening.

Whatever started the master (Makeflow's ``-T wq``, Parsl, a C program, a
script in another process), the supervisor needs only its port: the tunnel
runs exactly as for ``run``, the master is watched through its own status
protocol (worker counts and backlog from its status answers), and
workers are scaled from those counts. What it cannot do without the master
object: set the master's ``short-timeout`` (see :data:`HELP`).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from typing import Any

from .children import port_listening
from .config import Settings
from .engine import credentials_for
from .errors import AuthenticationFailed, ConfigError, ProtocolError
from .kinds import ANY_LABEL, WORK_QUEUE, kind_of_status
from .master import MasterInfo
from .passwords import AUTO
from .runapp import EngineThread, StartWatch, summary_line
from .status import status_dir
from .wqproto import request_status

# How long a master's port must refuse connections before --until-master-exits ends the run.
GONE_AFTER = 10.0

HELP = (
    "Supervise a Work Queue master or a TaskVine manager that is already listening on --master-port, "
    "whatever started it (Makeflow -T wq, Parsl, a C master, a script in another process; which kind "
    "it is, its status answer says, and the workers follow: work_queue_worker or vine_worker): the "
    "tunnel, the workers and "
    "their jobs, as 'run' does, until Ctrl-C or SIGTERM (or, with --until-master-exits, until the "
    "master has stopped listening for 10 s). What differs from 'run': the supervisor holds no master "
    "object, so it cannot raise the master's short-timeout (5 s of its own), and a worker whose answer "
    "sits in a stalled tunnel for longer is dropped and its tasks requeued; set it in the master "
    "instead (q.tune('short-timeout', 120), or makeflow's wq options). Worker counts and the backlog "
    "come from the master's status answers, which it gives only from inside its wait(). "
    "--password-file must be the master's own file ('auto' cannot be: the master already runs)."
)


def identify(port: int, settings: Settings, timeout: float = 5.0) -> MasterInfo:
    """Ask what listens on 127.0.0.1:``port``; a master's identity, or a ConfigError that says what to do."""

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port)

    try:
        reply = asyncio.run(request_status(connect, credentials=credentials_for(settings), timeout=timeout))
    except ConnectionRefusedError:
        raise ConfigError(
            f"nothing listens on port {port} of this machine",
            "start the master first, or give its port with --master-port",
        ) from None
    except TimeoutError:
        # A master busy outside wait() says nothing for now; the tunnel's probes wait for it.
        print(
            f"wqsupervisor: port {port} did not answer a status request in {timeout:g} s "
            "(a master outside wait()?); supervising it anyway",
            file=sys.stderr,
        )
        return MasterInfo(port=port)
    except AuthenticationFailed as exc:
        raise ConfigError(
            f"the master on port {port} refused the password: {exc}",
            "give the master's own password file with --password-file",
        ) from None
    except ProtocolError as exc:
        raise ConfigError(
            f"port {port} is not a {ANY_LABEL}: {exc}", "give the master's port with --master-port"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot reach port {port}: {exc}", "check --master-port") from None
    entry = next((e for e in reply if isinstance(e, dict)), {})
    name = entry.get("project") or entry.get("name")
    # A status without a type we know: an older Work Queue master, most likely.
    kind = kind_of_status(entry) or WORK_QUEUE
    return MasterInfo(
        port=port, name=str(name) if name else None, password_file=settings.password_file, kind=kind.name
    )


def attach_master(
    settings: Settings, port: int, *, until_master_exits: bool = False, view: bool = True
) -> int:
    """Supervise the master on ``port`` until a signal (or its end); returns the exit status.

    With ``view`` and a terminal on stdout, a live view replaces the log lines.
    """
    if not 0 < port < 65536:
        raise ConfigError(f"--master-port {port} is not a port", "give the master's port, 1 to 65535")
    settings.require_tunnel()
    if settings.password_file == AUTO:
        raise ConfigError(
            "--password-file auto makes a new password, but this master already runs with its own",
            "give the master's password file, or --allow-no-password for a master without one",
        )
    if settings.password_file is None and not settings.allow_no_password:
        raise ConfigError(
            "no --password-file for the master",
            "give the master's password file, or --allow-no-password if it has none",
        )
    master = identify(port, settings)
    status_dir()
    started = time.monotonic()
    stop = threading.Event()
    watch = StartWatch()
    watch.on_fatal = stop.set
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()

    from .view import should_use_live_view

    use_live = view and should_use_live_view(sys.stdout)
    host = EngineThread(log=not use_live)
    metrics = live = None
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        host.add_sink(watch)
        if use_live:
            from .view import LiveView

            live = LiveView(host.snapshot)
            live.start()
        if settings.metrics_port is not None:
            from .metrics import MetricsServer

            metrics = MetricsServer(host.snapshot, host=settings.metrics_host, port=settings.metrics_port)
            metrics.start()

        async def attach() -> str:
            return host.engine.attach(master, settings).id

        sup_id = host.call(attach())
        gone_since: float | None = None
        while not stop.wait(1.0):
            if not until_master_exits:
                continue
            if port_listening(port):
                gone_since = None
            elif gone_since is None:
                gone_since = time.monotonic()
            elif time.monotonic() - gone_since >= GONE_AFTER:
                break
        # The tunnel, the workers' jobs and the sampler end first, so the last line tells how they ended.
        host.call(host.engine.detach(sup_id), timeout=60)
        snapshot = host.snapshot()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if live is not None:
            live.stop()
        if metrics is not None:
            metrics.stop()
        host.stop()
    status = 2 if watch.say_fatal() else 0
    name = f"master on port {port}" + (f" ({master.name})" if master.name else "")
    signum = received[0] if received else None
    print(summary_line(name, status, time.monotonic() - started, snapshot, signum), file=sys.stderr)
    return status
